//! The JSON form of a command, for tools: `{"op": "TLBI_NH_VA", "opcode": 18, "vmid": 3, ...}`.
//!
//! Every field appears under its spec name in lower case (the names of the layout table), as a
//! JSON number, or `true`/`false` for a one-bit flag. `addr` and `msiaddr` are byte addresses
//! (the field's bits in place, the bits below them zero); `tg` is the TG field's number (0 none,
//! 1 4K, 2 16K, 3 64K). Keys come out in sorted order. Numbers are exact u64s; a consumer that
//! reads JSON numbers as doubles (JavaScript) loses the low bits of addresses above 2^53.

use serde_json::{Map, Value};
use vcmdq::command::FieldKind;
use vcmdq::command::{Command, DecodeError};

/// The JSON object of a decoded command: `op`, `opcode` and every field of its layout.
pub fn to_json(cmd: &Command) -> Value {
    let layout = cmd.layout();
    let mut m = Map::new();
    m.insert("op".into(), layout.name.into());
    m.insert("opcode".into(), layout.opcode.into());
    // A decoded command always encodes; a hand-built one with an over-wide field has no bytes to
    // read the fields from, so it shows its error like a command that did not decode.
    let raw = match cmd.try_encode() {
        Ok(raw) => raw,
        Err(e) => {
            m.insert("error".into(), e.to_string().into());
            return Value::Object(m);
        }
    };
    for f in layout.fields {
        let v = f.get(&raw);
        let jv = match f.kind {
            FieldKind::Flag => Value::Bool(v != 0),
            FieldKind::Num | FieldKind::Hex | FieldKind::Addr | FieldKind::Tg => v.into(),
        };
        m.insert(f.name.into(), jv);
    }
    Value::Object(m)
}

/// The JSON object of 16 bytes that did not decode: `error` (the message), `opcode`, `op` when
/// the opcode is legal, and for RES0 bits the offending bits as `res0_d0` and `res0_d1`.
pub fn error_json(err: &DecodeError) -> Value {
    let mut m = Map::new();
    m.insert("error".into(), err.to_string().into());
    m.insert("opcode".into(), err.opcode().into());
    match *err {
        DecodeError::IllegalOpcode { .. } => {}
        DecodeError::Res0 { name, d0, d1, .. } => {
            m.insert("op".into(), name.into());
            m.insert("res0_d0".into(), d0.into());
            m.insert("res0_d1".into(), d1.into());
        }
        DecodeError::RangeWithoutGranule { name, .. } => {
            m.insert("op".into(), name.into());
        }
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vcmdq::command::{decode, RawCommand};

    #[test]
    fn range_tlbi_fields_by_spec_name() {
        let raw = RawCommand::new(
            0x12 | 3 << 12 | 1 << 20 | 3 << 32 | 7 << 48,
            0x8000_0000 | 2 << 10 | 3 << 8 | 1,
        );
        let v = to_json(&decode(raw).unwrap());
        assert_eq!(
            v,
            json!({"op": "TLBI_NH_VA", "opcode": 0x12, "vmid": 3, "asid": 7, "addr": 0x8000_0000u64,
                   "tg": 2, "num": 3, "scale": 1, "ttl": 3, "leaf": true})
        );
    }

    #[test]
    fn errors_carry_opcode_and_bits() {
        let e = decode(RawCommand::new(0x47, 0)).unwrap_err();
        assert_eq!(
            error_json(&e),
            json!({"error": "illegal opcode 0x47", "opcode": 0x47})
        );
        let e = decode(RawCommand::new(0x46 | 1 << 8, 1)).unwrap_err();
        let v = error_json(&e);
        assert_eq!(v["op"], "CMD_SYNC");
        assert_eq!(v["opcode"], 0x46);
        assert_eq!(v["res0_d0"], 0x100);
        assert_eq!(v["res0_d1"], 1);
    }

    #[test]
    fn hand_built_overwide_field_does_not_panic() {
        let c = Command::TlbiNhVa {
            vmid: 0,
            asid: 0,
            addr: 0x1001,
            tg: 0,
            num: 0,
            scale: 0,
            ttl: 0,
            leaf: false,
        };
        let v = to_json(&c);
        assert_eq!(v["op"], "TLBI_NH_VA");
        assert!(v["error"].as_str().unwrap().contains("addr"));
        assert!(c.to_string().starts_with("TLBI_NH_VA <unencodable: addr="));
    }
}
