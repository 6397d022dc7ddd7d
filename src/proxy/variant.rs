//! Which proxy runs: the fixed design, a faithful reproduction of a
//! defective SillyTavern release, or a mutant of the fixed design (all
//! compiled in so the harness can prove it catches them; never the default).

use std::fmt;
use std::str::FromStr;

pub use super::mutants::Mutant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Variant {
    /// The retry loop runs inside the handler future; every wait is
    /// cancellable; no task outlives its request.
    #[default]
    Fixed,
    /// SillyTavern 1.12.6: detached 5 s doubling retry timers, no
    /// `Retry-After`, no cancellation, the terminal write into the released
    /// request. The process survives.
    SillyTavern1126,
    /// SillyTavern 1.12.7: as 1.12.6, but the late timer's retry on an
    /// aborted request raises an error nothing handles and the process exits.
    SillyTavern1127,
    /// The fixed design with one deliberate defect (see [`Mutant`]).
    Mutant(Mutant),
}

impl Variant {
    /// The proxies a user may mean: the fixed one and the faithful
    /// SillyTavern reproductions.
    pub const ALL: [Variant; 3] = [
        Variant::Fixed,
        Variant::SillyTavern1126,
        Variant::SillyTavern1127,
    ];

    /// Every mutant, in [`Mutant::ALL`] order.
    pub const MUTANTS: [Variant; Mutant::ALL.len()] = {
        let mut out = [Variant::Fixed; Mutant::ALL.len()];
        let mut i = 0;
        while i < out.len() {
            out[i] = Variant::Mutant(Mutant::ALL[i]);
            i += 1;
        }
        out
    };

    pub fn name(self) -> &'static str {
        match self {
            Variant::Fixed => "fixed",
            Variant::SillyTavern1126 => "sillytavern-1.12.6",
            Variant::SillyTavern1127 => "sillytavern-1.12.7",
            Variant::Mutant(m) => m.name(),
        }
    }

    pub fn is_sillytavern(self) -> bool {
        matches!(self, Variant::SillyTavern1126 | Variant::SillyTavern1127)
    }

    /// The mutant, if this is one.
    pub fn mutant(self) -> Option<Mutant> {
        match self {
            Variant::Mutant(m) => Some(m),
            _ => None,
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Variant::ALL
            .into_iter()
            .chain(Variant::MUTANTS)
            .find(|v| v.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Variant::ALL.iter().map(|v| v.name()).collect();
                format!(
                    "unknown variant '{s}'; choose one of: {} (or a mutant: `tavernsim mutants --list`)",
                    names.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_parses_back_from_its_name() {
        for v in Variant::ALL.into_iter().chain(Variant::MUTANTS) {
            assert_eq!(v.name().parse::<Variant>(), Ok(v));
        }
        assert!("mutant-nope".parse::<Variant>().is_err());
        assert_eq!(Variant::default(), Variant::Fixed);
    }
}
