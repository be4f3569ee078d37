//! The column-mapping seam of seed: where a hub table and each of its columns go on
//! the member.
//!
//! Today this is the identity (same schema, table and column names). It is the one
//! place the configured mapping plugs into: everything else in seed asks it.

/// How one hub table maps onto the member.
#[derive(Debug, Clone, Default)]
pub struct Mapping;

impl Mapping {
    /// The identity mapping.
    pub fn identity() -> Mapping {
        Mapping
    }

    /// The member's schema and table for a hub table.
    pub fn table(&self, hub_schema: &str, hub_table: &str) -> (String, String) {
        (hub_schema.to_string(), hub_table.to_string())
    }

    /// The member column a hub column is copied into; `None`: not copied.
    pub fn column(&self, _hub_schema: &str, _hub_table: &str, hub_column: &str) -> Option<String> {
        Some(hub_column.to_string())
    }
}
