//! # patchlm-eval
//!
//! Evaluation harnesses: token-level perplexity and bits per byte, zero-shot multiple choice with
//! lm-eval-harness semantics, and comparison reports.
