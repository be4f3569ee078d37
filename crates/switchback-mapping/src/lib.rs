//! Table and column mapping from the hub to the member.
//!
//! * [`model`] is pure (no database): given a table's [`TableRule`] from the
//!   config, the hub's columns and the member's [`CatalogTable`], it builds the
//!   forward [`TableMap`] and lists every [`Problem`]; [`TableMap::reverse`] derives
//!   the mapping for the reverse sync (member → hub) and says what cannot be
//!   inverted.
//! * [`catalog`] reads a table's definition from either database's catalogs.
//! * [`check`] connects to both sides and validates a whole pipeline (the
//!   `switchback check` command; `run` and `capture` run it at start).
//!
//! Seed (bulk copy) and cutover (reverse sync) use the same model: resolve with
//! [`catalog::load_table`] on both sides, then [`model::map_table`].
//!
//! [`TableRule`]: switchback_config::TableRule
//! [`CatalogTable`]: catalog::CatalogTable
//! [`TableMap`]: model::TableMap
//! [`TableMap::reverse`]: model::TableMap::reverse
//! [`Problem`]: model::Problem

pub mod catalog;
pub mod check;
pub mod model;

pub use catalog::{CatalogColumn, CatalogTable};
pub use model::{map_table, ColumnTarget, MemberFill, Problem, ReverseMap, TableMap};
