//! Failure classes on the wire and in `drover_core`: one exhaustive match each way, so a class
//! added on one side fails to compile until the other knows it.

use drover_core::FailureClass as Core;

use crate::FailureClass as Wire;

/// A failure class number that this build does not know (a peer of another protocol).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown failure class {0}")]
pub struct UnknownFailureClass(pub i32);

impl Wire {
    /// The class of a failed attempt, `None` for no failure.
    pub fn to_core(self) -> Option<Core> {
        match self {
            Wire::None => None,
            Wire::Exit => Some(Core::Exit),
            Wire::Timeout => Some(Core::Timeout),
            Wire::Lost => Some(Core::Lost),
            Wire::Oom => Some(Core::Oom),
            Wire::Start => Some(Core::Start),
            Wire::Budget => Some(Core::Budget),
            Wire::Cancelled => Some(Core::Cancelled),
        }
    }

    /// A failure class field as received. Unlike prost's accessor, which reads an unknown
    /// number as "no failure", this refuses it.
    pub fn decode(field: i32) -> Result<Option<Core>, UnknownFailureClass> {
        Wire::try_from(field).map(Wire::to_core).map_err(|_| UnknownFailureClass(field))
    }

    /// The field value for `class` (`None`: no failure).
    pub fn encode(class: Option<Core>) -> i32 {
        Wire::from(class) as i32
    }
}

impl From<Core> for Wire {
    fn from(class: Core) -> Wire {
        match class {
            Core::Exit => Wire::Exit,
            Core::Timeout => Wire::Timeout,
            Core::Lost => Wire::Lost,
            Core::Oom => Wire::Oom,
            Core::Start => Wire::Start,
            Core::Budget => Wire::Budget,
            Core::Cancelled => Wire::Cancelled,
        }
    }
}

impl From<Option<Core>> for Wire {
    fn from(class: Option<Core>) -> Wire {
        class.map_or(Wire::None, Wire::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_survives_the_wire_and_unknown_numbers_are_refused() {
        for class in Core::ALL {
            assert_eq!(Wire::decode(Wire::encode(Some(*class))), Ok(Some(*class)));
        }
        assert_eq!(Wire::decode(Wire::encode(None)), Ok(None));
        assert_eq!(Wire::decode(99), Err(UnknownFailureClass(99)));
        assert_eq!(Wire::decode(-1), Err(UnknownFailureClass(-1)));
    }
}
