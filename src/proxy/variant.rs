//! Which proxy runs: the fixed design, or a faithful reproduction of a
//! defective SillyTavern release (compiled in so the harness can prove it
//! catches them; never the default).

use std::fmt;
use std::str::FromStr;

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
}

impl Variant {
    pub const ALL: [Variant; 3] = [
        Variant::Fixed,
        Variant::SillyTavern1126,
        Variant::SillyTavern1127,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Fixed => "fixed",
            Variant::SillyTavern1126 => "sillytavern-1.12.6",
            Variant::SillyTavern1127 => "sillytavern-1.12.7",
        }
    }

    pub fn is_sillytavern(self) -> bool {
        matches!(self, Variant::SillyTavern1126 | Variant::SillyTavern1127)
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
            .find(|v| v.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Variant::ALL.iter().map(|v| v.name()).collect();
                format!("unknown variant '{s}'; choose one of: {}", names.join(", "))
            })
    }
}
