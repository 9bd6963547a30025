//! The Docker runtime (being written).
