//! The mapping as cutover sees it: which table and column of one side feed which
//! of the other, through the direction's `[[tables.table]]` rules (for member →
//! hub, [`switchback_config::Tables::reversed`]: inverted renames, constants not sent
//! back). Sequences keep their names on both sides.

use std::collections::BTreeMap;

/// Columns of the tables of one side: `(schema, table)` → column names.
pub type Tables = BTreeMap<(String, String), Vec<ColumnInfo>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    /// NOT NULL without a default (or identity/generated): must receive a value.
    pub required: bool,
}

/// The sequence a source sequence moves on the target (identity).
pub fn target_sequence(schema: &str, name: &str) -> (String, String) {
    (schema.to_string(), name.to_string())
}

/// Checks that the direction `source` → `target` can be built for every source
/// table: the target table exists, every source column has a target column, and
/// every required target column gets a value. Returns every reason it cannot.
/// `source_side` / `target_side` name the databases in messages.
pub fn check_direction(
    source: &Tables,
    target: &Tables,
    rules: &switchback_config::Tables,
    source_side: &str,
    target_side: &str,
) -> Vec<String> {
    let mut reasons = Vec::new();
    for ((schema, table), cols) in source {
        let rule = rules.rule(schema, table);
        let (ts, tt) = rule.target();
        let (ts, tt) = (ts.to_string(), tt.to_string());
        // Source columns as named on the target; excluded ones are not sent.
        let sent: Vec<String> = cols
            .iter()
            .filter(|c| !rule.exclude_columns.contains(&c.name))
            .map(|c| {
                rule.rename
                    .get(&c.name)
                    .cloned()
                    .unwrap_or_else(|| c.name.clone())
            })
            .collect();
        let Some(tcols) = target.get(&(ts.clone(), tt.clone())) else {
            reasons.push(format!(
                "{source_side} table {schema}.{table} has no table {ts}.{tt} on the {target_side}: \
                 the {source_side} → {target_side} direction cannot write its rows. \
                 Fix: create it on the {target_side}, or exclude it with [tables] exclude"
            ));
            continue;
        };
        for c in &sent {
            if !tcols.iter().any(|t| &t.name == c) {
                reasons.push(format!(
                    "column {schema}.{table}.{} of the {source_side} has no column on the {target_side} \
                     ({ts}.{tt}): the {source_side} → {target_side} direction would lose its values. \
                     Fix: add the column on the {target_side} or drop it on the {source_side}",
                    c
                ));
            }
        }
        for t in tcols {
            if t.required && !sent.contains(&t.name) && !rule.constants.contains_key(&t.name) {
                reasons.push(format!(
                    "column {ts}.{tt}.{} of the {target_side} is NOT NULL without a default and gets \
                     no value from the {source_side}: rows written on the {source_side} cannot be \
                     inserted. Fix: give it a default, or add the column on the {source_side}",
                    t.name
                ));
            }
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(cols: &[(&str, bool)]) -> Vec<ColumnInfo> {
        cols.iter()
            .map(|(n, r)| ColumnInfo {
                name: n.to_string(),
                required: *r,
            })
            .collect()
    }

    #[test]
    fn every_reason_is_reported() {
        let mut member = Tables::new();
        member.insert(
            ("public".into(), "a".into()),
            t(&[("id", true), ("extra", false)]),
        );
        member.insert(("public".into(), "b".into()), t(&[("id", true)]));
        let mut hub = Tables::new();
        hub.insert(
            ("public".into(), "a".into()),
            t(&[("id", true), ("must", true)]),
        );
        let rules = switchback_config::Tables::default();
        let r = check_direction(&member, &hub, &rules, "member", "hub");
        assert_eq!(r.len(), 3, "{r:#?}");
        assert!(r[0].contains("public.a.extra"));
        assert!(r[1].contains("public.a.must"));
        assert!(r[2].contains("public.b"));
        hub.insert(("public".into(), "b".into()), t(&[("id", true)]));
        member
            .get_mut(&("public".into(), "a".into()))
            .unwrap()
            .pop();
        hub.get_mut(&("public".into(), "a".into())).unwrap().pop();
        assert!(check_direction(&member, &hub, &rules, "member", "hub").is_empty());
    }
}
