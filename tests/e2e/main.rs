//! End-to-end tests of the `switchback` binary against throwaway PostgreSQL
//! clusters (see `tests/harness`). One binary, so the shared hub and member start
//! once. `SWITCHBACK_TEST_SCALE=full` runs the long tests at full size.

mod apply;
mod capture;
mod cutover;
mod kafka;
mod kafka_json;
mod mapping;
mod queue_conformance;
mod seed;
