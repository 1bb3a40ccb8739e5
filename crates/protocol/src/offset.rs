use std::fmt;

/// A logical record number within a partition (never a byte position: that is a `FilePos`).
///
/// Offsets are `i64` on the Kafka wire, where negative values are sentinels; inside Cairn an offset
/// is always a real, non-negative record number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub u64);

impl Offset {
    /// The first offset of every partition.
    pub const ZERO: Offset = Offset(0);

    /// The offset `n` records later, or `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<Offset> {
        self.0.checked_add(n).map(Offset)
    }

    /// This offset as the wire's `i64`, or `None` above `i64::MAX`.
    pub fn to_wire(self) -> Option<i64> {
        i64::try_from(self.0).ok()
    }

    /// An offset from the wire's `i64`, or `None` for negative sentinels.
    pub fn from_wire(value: i64) -> Option<Offset> {
        u64::try_from(value).ok().map(Offset)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
