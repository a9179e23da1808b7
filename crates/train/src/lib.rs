//! # patchlm-train
//!
//! Phase-aware training: a run is a list of phases (patch phase, then token phase), each with a
//! fresh optimizer and schedule; checkpoints, exact resume and metrics.
