//! The column mapping of seed: where a hub table and each of its columns go on
//! the member, which rows are copied (the table's row filter) and which member
//! columns get a constant. It reads the same `[[tables.table]]` rules as apply
//! (`switchback-config`), so seed and the stream agree.

use switchback_config::{TableRule, Tables};

/// How hub tables map onto the member.
#[derive(Debug, Clone, Default)]
pub struct Mapping {
    tables: Option<Tables>,
}

impl Mapping {
    /// The identity mapping (same names, every column, every row).
    pub fn identity() -> Mapping {
        Mapping { tables: None }
    }

    /// The mapping configured in `[tables]`.
    pub fn from_config(tables: &Tables) -> Mapping {
        Mapping {
            tables: Some(tables.clone()),
        }
    }

    fn rule(&self, hub_schema: &str, hub_table: &str) -> TableRule {
        match &self.tables {
            Some(t) => t.rule(hub_schema, hub_table),
            None => TableRule::identity(hub_schema, hub_table),
        }
    }

    /// The member's schema and table for a hub table.
    pub fn table(&self, hub_schema: &str, hub_table: &str) -> (String, String) {
        let r = self.rule(hub_schema, hub_table);
        let (s, t) = r.target();
        (s.to_string(), t.to_string())
    }

    /// The member column a hub column is copied into; `None`: not copied.
    pub fn column(&self, hub_schema: &str, hub_table: &str, hub_column: &str) -> Option<String> {
        let r = self.rule(hub_schema, hub_table);
        if r.exclude_columns.iter().any(|c| c == hub_column) {
            return None;
        }
        Some(
            r.rename
                .get(hub_column)
                .cloned()
                .unwrap_or_else(|| hub_column.to_string()),
        )
    }

    /// The table's row filter (a SQL condition on the hub's columns), if any.
    pub fn row_filter(&self, hub_schema: &str, hub_table: &str) -> Option<String> {
        self.rule(hub_schema, hub_table).row_filter
    }

    /// Member-only columns filled with a constant: (member column, value as text).
    pub fn constants(&self, hub_schema: &str, hub_table: &str) -> Vec<(String, String)> {
        self.rule(hub_schema, hub_table)
            .constants
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_rules() {
        let id = Mapping::identity();
        assert_eq!(id.table("s", "t"), ("s".into(), "t".into()));
        assert_eq!(id.column("s", "t", "c").as_deref(), Some("c"));
        let mut rule = TableRule::identity("public", "person");
        rule.target_name = Some("people".into());
        rule.rename.insert("last_name".into(), "surname".into());
        rule.exclude_columns.push("secret".into());
        rule.row_filter = Some("id < 10".into());
        rule.constants.insert("source".into(), "hub".into());
        let tables = Tables {
            include: vec!["*.*".into()],
            exclude: Vec::new(),
            no_key: Default::default(),
            drift: Default::default(),
            table: vec![rule],
        };
        let m = Mapping::from_config(&tables);
        assert_eq!(
            m.table("public", "person"),
            ("public".into(), "people".into())
        );
        assert_eq!(
            m.column("public", "person", "last_name").as_deref(),
            Some("surname")
        );
        assert_eq!(m.column("public", "person", "secret"), None);
        assert_eq!(m.column("public", "person", "id").as_deref(), Some("id"));
        assert_eq!(m.row_filter("public", "person").as_deref(), Some("id < 10"));
        assert_eq!(
            m.constants("public", "person"),
            vec![("source".into(), "hub".into())]
        );
        assert_eq!(
            m.table("public", "other"),
            ("public".into(), "other".into())
        );
    }
}
