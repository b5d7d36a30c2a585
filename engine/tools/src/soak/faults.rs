//! The physical faults a soak injects, decided up front from the seed (the hardware model takes
//! its faults as a list): about one every `every` physical positions, at a random offset, of a
//! random kind; one event in eight is a cluster of two to four faults within a few positions
//! of each other (the same position included), the case where a repaired or retried command
//! fails again.

use std::time::Duration;
use vcmdq::hwmodel::Fault;
use vcmdq::mock::Rng;

/// Counts of scheduled faults by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// CERROR_ILL on the command at the position.
    pub ill: u64,
    /// CERROR_ABT (fetch abort) at the position.
    pub abt: u64,
    /// CERROR_ATC_INV_SYNC on the first CMD_SYNC at or after the position.
    pub atc_inv_sync: u64,
    /// The consumer stalls for a few microseconds.
    pub stall: u64,
}

impl FaultCounts {
    /// Of every kind.
    pub fn total(&self) -> u64 {
        self.ill + self.abt + self.atc_inv_sync + self.stall
    }

    /// Counts `faults`.
    pub fn of(faults: &[Fault]) -> FaultCounts {
        let mut c = FaultCounts::default();
        for f in faults {
            match f {
                Fault::Ill { .. } => c.ill += 1,
                Fault::Abt { .. } => c.abt += 1,
                Fault::AtcInvSync { .. } => c.atc_inv_sync += 1,
                Fault::Stall { .. } | Fault::Hold { .. } => c.stall += 1,
            }
        }
        c
    }
}

/// Faults for one physical queue, at positions below `horizon`: about one every `every`
/// positions (none if `every` is 0), stalls up to `max_stall` long.
pub fn schedule(seed: u64, every: u64, horizon: u64, max_stall: Duration) -> Vec<Fault> {
    let mut faults = Vec::new();
    if every == 0 {
        return faults;
    }
    let mut rng = Rng::fork(seed, 0xfa17);
    let max_stall_ns = (max_stall.as_nanos() as u64).max(1);
    let mut base = 0u64;
    loop {
        let at = base + rng.below(every);
        if at >= horizon {
            break;
        }
        let n = if rng.below(8) == 0 {
            rng.range(2, 4)
        } else {
            1
        };
        let mut pos = at;
        for _ in 0..n {
            faults.push(match rng.below(20) {
                0..6 => Fault::Ill { at: pos },
                6..11 => Fault::Abt { at: pos },
                11..16 => Fault::AtcInvSync { at: pos },
                _ => Fault::Stall {
                    at: pos,
                    for_: Duration::from_nanos(rng.range(1, max_stall_ns)),
                },
            });
            pos += rng.below(4);
        }
        base += every;
    }
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_one_per_interval_of_every_kind_with_clusters() {
        let f = schedule(3, 1000, 1_000_000, Duration::from_micros(5));
        let c = FaultCounts::of(&f);
        assert!((1000..1600).contains(&c.total()), "{c:?}");
        assert!(
            c.ill > 100 && c.abt > 100 && c.atc_inv_sync > 100 && c.stall > 50,
            "{c:?}"
        );
        let mut at: Vec<u64> = f
            .iter()
            .map(|f| match *f {
                Fault::Ill { at }
                | Fault::Abt { at }
                | Fault::AtcInvSync { at }
                | Fault::Stall { at, .. }
                | Fault::Hold { at } => at,
            })
            .collect();
        assert!(at.iter().all(|&a| a < 1_000_000));
        at.sort_unstable();
        let close = at.windows(2).filter(|w| w[1] - w[0] < 4).count();
        assert!(close > 50, "clusters: {close}");
        assert!(schedule(3, 0, 1_000_000, Duration::ZERO).is_empty());
        assert_eq!(f, schedule(3, 1000, 1_000_000, Duration::from_micros(5)));
    }
}
