//! The microVM runtime (being written).
