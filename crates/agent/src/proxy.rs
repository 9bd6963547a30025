//! The per-task LLM metering proxy (being written).
