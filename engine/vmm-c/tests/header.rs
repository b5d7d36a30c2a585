//! `include/vcmdq_vmm.h` declares exactly the functions `src/lib.rs` exports, and its register
//! offsets are the library's; the C API's errors are negative errnos with a message.

use std::collections::BTreeSet;
use std::ffi::CStr;
use std::path::Path;

use vcmdq_vmm::regs;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// Names of `extern "C" fn`s exported from the Rust source.
fn exported(src: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut lines = src.lines().peekable();
    while let Some(l) = lines.next() {
        if l.trim() != "#[no_mangle]" {
            continue;
        }
        let decl = lines.next().expect("a fn after #[no_mangle]");
        let name = decl
            .split("extern \"C\" fn ")
            .nth(1)
            .and_then(|r| r.split('(').next())
            .unwrap_or_else(|| panic!("not an extern \"C\" fn: {decl}"));
        names.insert(name.to_string());
    }
    names
}

/// Names of the functions the header declares (`vcmdq_...(` at the end of a return type).
fn declared(h: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for l in h.lines() {
        let l = l.trim();
        if l.starts_with('#') || l.starts_with('*') || l.starts_with("/*") || !l.contains('(') {
            continue;
        }
        let head = l.split('(').next().unwrap();
        if let Some(name) = head.split([' ', '*']).next_back() {
            if name.starts_with("vcmdq_") {
                names.insert(name.to_string());
            }
        }
    }
    names
}

fn define(h: &str, name: &str) -> String {
    h.lines()
        .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
        .unwrap_or_else(|| panic!("the header has no {name}"))
        .split("/*")
        .next()
        .unwrap()
        .trim()
        .to_string()
}

fn value(expr: &str) -> usize {
    // The header's values are hex literals, or `2 * 0x10000 + 0x1000` for the page size.
    expr.split('+')
        .map(|term| {
            term.split('*')
                .map(|f| {
                    let f = f
                        .trim()
                        .trim_start_matches('(')
                        .trim_end_matches(')')
                        .trim();
                    match f.strip_prefix("0x") {
                        Some(h) => usize::from_str_radix(h, 16).unwrap(),
                        None => f.parse().unwrap(),
                    }
                })
                .product::<usize>()
        })
        .sum()
}

#[test]
fn the_header_declares_exactly_the_exported_functions() {
    let src = exported(&read("src/lib.rs"));
    let h = declared(&read("include/vcmdq_vmm.h"));
    assert!(src.len() >= 15, "{src:?}");
    assert_eq!(src, h, "src/lib.rs exports vs include/vcmdq_vmm.h declares");
}

#[test]
fn the_headers_register_offsets_are_the_librarys() {
    let h = read("include/vcmdq_vmm.h");
    for (name, want) in [
        ("VCMDQ_PAGE_BYTES", regs::REGISTER_PAGE_BYTES),
        ("VCMDQ_PAGE1_OFFSET", regs::PAGE1_OFFSET),
        ("VCMDQ_VINTF_OFFSET", regs::VINTF_OFFSET),
        ("VCMDQ_STRIDE", regs::VCMDQ_STRIDE),
        ("VCMDQ_CONS", regs::VCMDQ_CONS),
        ("VCMDQ_PROD", regs::VCMDQ_PROD),
        ("VCMDQ_CONFIG", regs::VCMDQ_CONFIG),
        ("VCMDQ_STATUS", regs::VCMDQ_STATUS),
        ("VCMDQ_GERROR", regs::VCMDQ_GERROR),
        ("VCMDQ_GERRORN", regs::VCMDQ_GERRORN),
        ("VCMDQ_BASE", regs::VCMDQ_BASE),
        ("VCMDQ_LVCMDQ_ERR_MAP", regs::VINTF_LVCMDQ_ERR_MAP),
        ("VCMDQ_MAX_RAM_REGIONS", vcmdq_vmm_c::MAX_RAM_REGIONS),
    ] {
        assert_eq!(value(&define(&h, name)), want, "{name}");
    }
}

#[test]
fn errors_are_negative_errnos_with_a_message_on_the_calling_thread() {
    let mut vmm = std::ptr::null_mut();
    // SAFETY: `vmm` is a valid place for the pointer.
    assert_eq!(unsafe { vcmdq_vmm_c::vcmdq_vmm_start(1, &mut vmm) }, 0);
    // SAFETY: `vmm` came from vcmdq_vmm_start.
    let r = unsafe { vcmdq_vmm_c::vcmdq_vmm_set_dev_id(vmm, 7, 1, 0x10) };
    assert_eq!(r, -libc_enoent());
    // SAFETY: the message is a NUL-terminated string valid until the next failing call.
    let msg = unsafe { CStr::from_ptr(vcmdq_vmm_c::vcmdq_last_error()) };
    assert!(msg.to_str().unwrap().contains("ENOENT"), "{msg:?}");
    // SAFETY: a NULL `out` is refused, not written.
    let r = unsafe { vcmdq_vmm_c::vcmdq_vmm_next_event(vmm, std::ptr::null_mut()) };
    assert_eq!(r, -22);
    // SAFETY: `vmm` came from vcmdq_vmm_start and is not used again.
    assert_eq!(unsafe { vcmdq_vmm_c::vcmdq_vmm_shutdown(vmm) }, 0);
}

fn libc_enoent() -> i32 {
    2
}

#[test]
fn a_memfd_page_hands_out_a_descriptor_of_the_memory_the_engine_reads() {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileExt;
    let (mut page, mut fd) = (std::ptr::null_mut(), -1);
    // SAFETY: both are valid places for one write.
    let r = unsafe { vcmdq_vmm_c::vcmdq_page_new_memfd(&mut page, &mut fd) };
    assert_eq!(r, 0);
    assert!(fd >= 0);
    // SAFETY: the descriptor is new and ours (the function's contract); File closes it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    assert!(
        file.metadata().unwrap().len() >= vcmdq_vmm::regs::REGISTER_PAGE_BYTES as u64,
        "the memfd holds the whole page"
    );
    // The guest's PROD of logical VCMDQ 1, written through the descriptor, is what the page's
    // words show: one memory, not a copy.
    let prod = vcmdq_vmm::regs::VCMDQ_STRIDE + vcmdq_vmm::regs::VCMDQ_PROD;
    file.write_all_at(&0x1234u32.to_le_bytes(), prod as u64)
        .unwrap();
    // SAFETY: `page` came from vcmdq_page_new_memfd and lives; the index is inside the page.
    let seen = unsafe {
        (*vcmdq_vmm_c::vcmdq_page_words(page).add(prod / 4))
            .load(std::sync::atomic::Ordering::Acquire)
    };
    assert_eq!(seen, 0x1234);
    // SAFETY: the page is not used again; the descriptor stays valid on its own.
    unsafe { vcmdq_vmm_c::vcmdq_page_free(page) };
    assert!(
        file.metadata().is_ok(),
        "the caller's descriptor outlives the page"
    );
    // SAFETY: NULL places are refused, not written.
    let r = unsafe { vcmdq_vmm_c::vcmdq_page_new_memfd(std::ptr::null_mut(), &mut fd) };
    assert_eq!(r, -22);
}
