//! `switchback check`: validates a pipeline against both databases before
//! anything runs, and lists every problem with its fix. `run` and `capture` run the
//! same checks at start (capture only the hub's).

use std::fmt::Write;

use switchback_config::{Config, NoKeyPolicy, Operation};
use switchback_core::{quote_ident, quote_literal, Classify, ErrorClass};
use switchback_pg::hub::{self, Session};

use crate::catalog::{self, CatalogTable};
use crate::model::{self, ColumnTarget, MemberFill, Problem, TableMap};

/// Which databases to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sides {
    /// The hub only (`capture`, which may not reach the member).
    Hub,
    /// Hub and member (`check`, `run`).
    Both,
}

/// One table in scope.
#[derive(Debug, Clone)]
pub struct TableReport {
    pub hub: CatalogTable,
    /// `(schema, table)` on the member.
    pub target: (String, String),
    /// Operations that will be published (after the no-key policy).
    pub ops: Vec<Operation>,
    pub row_filter: Option<String>,
    pub member: Option<CatalogTable>,
    pub map: Option<TableMap>,
}

/// The outcome of a check.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub tables: Vec<TableReport>,
    pub problems: Vec<Problem>,
    /// Things worth knowing that are not problems.
    pub notes: Vec<String>,
    /// The member was reached and its tables checked.
    pub member_checked: bool,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// No problem but unreachable databases (`run` and `capture` start anyway and retry).
    pub fn ok_but_unreachable(&self) -> bool {
        self.problems.iter().all(|p| p.transient)
    }

    /// The problems as one error message (for `run` and `capture`).
    pub fn error_text(&self) -> String {
        let mut s = format!(
            "{} problem(s) found before starting (run `switchback check` for the full report):",
            self.problems.len()
        );
        for p in &self.problems {
            let _ = write!(s, "\n  - {p}");
        }
        s
    }

    /// The readable report: tables, columns, mappings (forward and reverse), notes
    /// and problems.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for t in &self.tables {
            let ops: Vec<&str> = t.ops.iter().map(|o| o.as_str()).collect();
            let target = format!(
                "{}.{}{}",
                t.target.0,
                t.target.1,
                match (self.member_checked, &t.member) {
                    (false, _) => " (member not checked)",
                    (true, None) => " (missing on the member)",
                    (true, Some(_)) => "",
                }
            );
            let _ = writeln!(
                s,
                "table {} -> {}{}  [{}]{}",
                t.hub.display(),
                target,
                if t.hub.kind == 'p' {
                    " (partitioned, via root)"
                } else {
                    ""
                },
                ops.join(", "),
                t.row_filter
                    .as_deref()
                    .map(|f| format!("  where {f}"))
                    .unwrap_or_default()
            );
            let Some(map) = &t.map else { continue };
            let w = t
                .hub
                .columns
                .iter()
                .map(|c| c.name.chars().count() + c.type_name.chars().count() + 3)
                .max()
                .unwrap_or(10)
                .max(14);
            for (h, target) in &map.columns {
                let hty = t.hub.column(h).map(|c| c.type_name.as_str()).unwrap_or("?");
                let left = format!("{h} ({hty})");
                let right = match target {
                    ColumnTarget::Member(m) => {
                        let mty = t
                            .member
                            .as_ref()
                            .and_then(|mt| mt.column(m))
                            .map(|c| c.type_name.clone())
                            .unwrap_or_default();
                        let renamed = if m != h { "  (renamed)" } else { "" };
                        format!("-> {m} ({mty}){renamed}")
                    }
                    ColumnTarget::Generated(m) => {
                        format!("x  {m} is generated on the member: never written")
                    }
                    ColumnTarget::Excluded => "x  excluded".into(),
                    ColumnTarget::Ignored => {
                        "x  not on the member: ignored (drift = ignore-new-columns)".into()
                    }
                    ColumnTarget::ToAdd => {
                        "+  not on the member: added there, nullable (drift = add-columns)".into()
                    }
                    ColumnTarget::Missing => "!  not on the member (problem)".into(),
                };
                let _ = writeln!(s, "    {left:<w$} {right}");
            }
            for (m, fill) in &map.member_only {
                let fill = match fill {
                    MemberFill::Constant(v) => format!("constant {}", quote_literal(v)),
                    MemberFill::Default => "its default".into(),
                    MemberFill::Generated => "generated".into(),
                    MemberFill::Null => "NULL".into(),
                    MemberFill::Missing => "nothing: NOT NULL without default (problem)".into(),
                };
                let _ = writeln!(s, "    {:<w$} -> {m}  member only, filled with {fill}", "");
            }
            let rev = map.reverse();
            let pairs: Vec<String> = rev
                .columns
                .iter()
                .map(|(m, h)| format!("{m} -> {h}"))
                .collect();
            let _ = writeln!(
                s,
                "  reverse {}.{} -> {}.{}: {}",
                rev.source.0,
                rev.source.1,
                rev.target.0,
                rev.target.1,
                pairs.join(", ")
            );
            for n in &rev.not_inverted {
                let _ = writeln!(s, "    not inverted: {n}");
            }
        }
        if self.tables.is_empty() {
            s.push_str("no table of the hub is in scope of [tables]\n");
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        if self.problems.is_empty() {
            s.push_str("OK: no problem found\n");
        } else {
            let _ = writeln!(s, "{} problem(s):", self.problems.len());
            for (i, p) in self.problems.iter().enumerate() {
                let what = match &p.column {
                    Some(c) => format!("{} column {c:?}", p.table),
                    None => p.table.clone(),
                };
                let _ = writeln!(
                    s,
                    "{:>3}. {what}: {}\n     fix: {}",
                    i + 1,
                    p.problem,
                    p.fix
                );
            }
        }
        s
    }
}

fn describe(e: &tokio_postgres::Error) -> String {
    switchback_pg::error::describe_sql_error(e)
}

/// Checks the pipeline: every problem is collected, none stops the check.
pub async fn check(cfg: &Config, sides: Sides) -> Report {
    // The member connection is set up while the hub is checked.
    let member = async {
        if sides == Sides::Both {
            Some(connect(cfg.member_pg(), "member").await)
        } else {
            None
        }
    };
    let hub = async {
        let mut r = Report::default();
        match connect(cfg.hub_pg(), "hub").await {
            Ok(hub_s) => check_hub(cfg, &hub_s, &mut r).await,
            Err(p) => r.problems.push(p),
        }
        r
    };
    // The hub's report goes on with the member's findings.
    let (mut r, member) = futures_util::future::join(hub, member).await;
    if let Some(member) = member {
        match member {
            Ok(m) => {
                r.member_checked = true;
                check_member(cfg, &m, &mut r).await
            }
            Err(p) => r.problems.push(p),
        }
    }
    r
}

/// A session to one side, or the problem of reaching it.
async fn connect(
    pg: Result<tokio_postgres::Config, switchback_config::ConfigError>,
    side: &'static str,
) -> Result<Session, Problem> {
    let fix = format!("check [{side}] url, the password and that the {side} accepts connections");
    let pg = pg.map_err(|e| Problem::new(side, None, e.to_string(), fix.clone()))?;
    hub::connect(&pg, side).await.map_err(|e| {
        let mut p = Problem::new(side, None, format!("cannot connect: {e}"), fix);
        p.transient = e.class() == ErrorClass::Transient;
        p
    })
}

async fn check_hub(cfg: &Config, hub_s: &Session, r: &mut Report) {
    if let Err(e) = hub::preflight(hub_s).await {
        r.problems.push(Problem::new(
            "hub",
            None,
            e.to_string(),
            "see above; each item names its fix".into(),
        ));
    }
    let tables = match hub::list_tables(hub_s, |s, t| cfg.tables.matches(s, t)).await {
        Ok(t) => t,
        Err(e) => {
            r.problems.push(Problem::new(
                "hub",
                None,
                format!("cannot list tables: {e}"),
                "grant the hub role access to the catalogs".into(),
            ));
            return;
        }
    };
    for rule in &cfg.tables.table {
        if !tables
            .iter()
            .any(|t| t.schema == rule.schema && t.table == rule.name)
        {
            r.problems.push(Problem::new(
                rule.display(),
                None,
                "is configured in [[tables.table]] but is not a table of the hub (a partition is published via \
                 its root: configure the root)"
                    .into(),
                "correct schema/name (exact, case-sensitive), or remove the entry".into(),
            ));
        }
    }
    let names: Vec<(&str, &str)> = tables
        .iter()
        .map(|t| (t.schema.as_str(), t.table.as_str()))
        .collect();
    let loaded = catalog::load_tables(&hub_s.client, &names).await;
    for (t, hub_t) in tables.iter().zip(loaded) {
        let display = t.display();
        let hub_t = match hub_t {
            Ok(Some(h)) => h,
            Ok(None) => continue, // dropped meanwhile
            Err(e) => {
                r.problems.push(Problem::new(
                    &display,
                    None,
                    format!("cannot read its definition on the hub: {}", describe(&e)),
                    "grant the hub role access to the table".into(),
                ));
                continue;
            }
        };
        let rule = cfg.tables.rule(&t.schema, &t.table);
        let mut ops = rule.ops();
        let changes = ops.contains(&Operation::Update) || ops.contains(&Operation::Delete);
        if hub_t.lacks_identity() && changes {
            match cfg.tables.no_key {
                NoKeyPolicy::Refuse => r.problems.push(Problem::new(
                    &display,
                    None,
                    "the hub table has no primary key and no replica identity: once published for UPDATE and \
                     DELETE, the hub would reject its own UPDATE and DELETE on it"
                        .into(),
                    "add a primary key; or ALTER TABLE ... REPLICA IDENTITY FULL (or USING INDEX); or set [tables] \
                     no_key = \"replica-identity-full\" or \"insert-only\"; or operations = [\"insert\"] for this \
                     table; or exclude it"
                        .into(),
                )),
                NoKeyPolicy::InsertOnly => {
                    ops.retain(|o| matches!(o, Operation::Insert | Operation::Truncate));
                    r.notes.push(format!(
                        "{display}: no key on the hub: only inserts replicate ([tables] no_key = \"insert-only\")"
                    ));
                }
                NoKeyPolicy::ReplicaIdentityFull => r.notes.push(format!(
                    "{display}: no key on the hub: capture sets REPLICA IDENTITY FULL ([tables] no_key)"
                )),
            }
        }
        if !hub_t.privileges.owner {
            r.problems.push(Problem::new(
                &display,
                None,
                "the hub role does not own the table, so it cannot add it to the publication".into(),
                format!(
                    "connect as the owner (or a member of the owning role), or ALTER TABLE {} OWNER TO the hub role",
                    hub_t.qualified()
                ),
            ));
        }
        if let Some(f) = &rule.row_filter {
            if let Some(p) = probe_row_filter(hub_s, &hub_t, f, &ops).await {
                r.problems.push(p);
            }
        }
        let (ts, tn) = rule.target();
        r.tables.push(TableReport {
            target: (ts.to_string(), tn.to_string()),
            hub: hub_t,
            ops,
            row_filter: rule.row_filter.clone(),
            member: None,
            map: None,
        });
    }
}

/// Tries the row filter in a publication that is rolled back, with UPDATE and
/// DELETE probes: PG15 accepts a row filter on columns outside the replica identity
/// but then rejects the hub's own UPDATE/DELETE on the table.
async fn probe_row_filter(
    hub_s: &Session,
    t: &CatalogTable,
    filter: &str,
    ops: &[Operation],
) -> Option<Problem> {
    let publish: Vec<&str> = ops.iter().map(|o| o.as_str()).collect();
    let name = quote_ident(&format!("switchback_probe_{}", std::process::id()));
    let mut stmts = vec![format!(
        "CREATE PUBLICATION {name} FOR TABLE {} WHERE ({filter}) WITH (publish = {}, publish_via_partition_root = true)",
        t.qualified(),
        quote_literal(&publish.join(", "))
    )];
    let first = t
        .columns
        .iter()
        .find(|c| !c.generated)
        .map(|c| quote_ident(&c.name));
    if let (Some(c), true) = (&first, ops.contains(&Operation::Update)) {
        stmts.push(format!(
            "UPDATE {} SET {c} = {c} WHERE false",
            t.qualified()
        ));
    }
    if ops.contains(&Operation::Delete) {
        stmts.push(format!("DELETE FROM {} WHERE false", t.qualified()));
    }
    if let Err(e) = hub_s.client.batch_execute("BEGIN").await {
        return Some(Problem::new(
            t.display(),
            None,
            format!("cannot check the row filter: {}", describe(&e)),
            "check the hub connection".into(),
        ));
    }
    let mut problem = None;
    for s in &stmts {
        // One statement each (extended protocol): the filter cannot add another.
        if let Err(e) = hub_s.client.execute(s.as_str(), &[]).await {
            let identity = e.code().map(|c| c.code()) == Some("42P10");
            problem = Some(Problem::new(
                t.display(),
                None,
                format!("row_filter {filter:?} is not usable: {}", describe(&e)),
                if identity {
                    "PostgreSQL 15 lets a row filter of a table published for UPDATE or DELETE use only replica \
                     identity columns (the primary key by default): filter on key columns, set REPLICA IDENTITY \
                     FULL on the hub, or replicate only inserts (operations = [\"insert\"])"
                        .into()
                } else {
                    "correct the WHERE expression: plain columns, constants and immutable built-in functions only"
                        .into()
                },
            ));
            break;
        }
    }
    let _ = hub_s.client.batch_execute("ROLLBACK").await;
    problem
}

async fn check_member(cfg: &Config, m: &Session, r: &mut Report) {
    match m
        .client
        .query_one(
            "SELECT has_function_privilege('pg_replication_origin_session_setup(text)', 'EXECUTE')",
            &[],
        )
        .await
    {
        Ok(row) if row.get::<_, bool>(0) => {}
        Ok(_) => r.problems.push(Problem::new(
            "member",
            None,
            "the member role may not use replication origins (apply records its progress in one)".into(),
            "connect as a superuser, or GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), \
             pg_replication_origin_session_setup(text), pg_replication_origin_xact_setup(pg_lsn, timestamptz), \
             pg_replication_origin_session_progress(boolean) TO the member role"
                .into(),
        )),
        Err(e) => r.problems.push(Problem::new(
            "member",
            None,
            format!("cannot check privileges: {}", describe(&e)),
            "check the member connection".into(),
        )),
    }
    if cfg.apply.replica_role {
        let may = m
            .client
            .query_one(
                "SELECT has_parameter_privilege('session_replication_role', 'SET')",
                &[],
            )
            .await
            .map(|row| row.get::<_, bool>(0))
            .unwrap_or(true);
        if !may {
            r.notes.push(
                "the member role may not SET session_replication_role: member triggers and foreign keys will \
                 fire during apply, and the fast path's per-table batching is off. Fix: GRANT SET ON PARAMETER \
                 session_replication_role TO the member role (PG15+), or connect as a superuser"
                    .into(),
            );
        }
    }
    let rules: Vec<_> = r
        .tables
        .iter()
        .map(|t| cfg.tables.rule(&t.hub.schema, &t.hub.name))
        .collect();
    let names: Vec<(&str, &str)> = rules.iter().map(|rule| rule.target()).collect();
    let loaded = catalog::load_tables(&m.client, &names).await;
    for ((t, rule), member) in r.tables.iter_mut().zip(&rules).zip(loaded) {
        let display = t.hub.display();
        let (ts, tn) = rule.target();
        let member = match member {
            Ok(Some(mt)) => mt,
            Ok(None) => {
                r.problems.push(Problem::new(
                    &display,
                    None,
                    format!("the target table {ts}.{tn} does not exist on the member"),
                    format!(
                        "create it on the member (CREATE TABLE {}.{} ...), set target_schema/target_name in \
                         [[tables.table]], or exclude the table with [tables] exclude = [\"{display}\"]",
                        quote_ident(ts),
                        quote_ident(tn)
                    ),
                ));
                continue;
            }
            Err(e) => {
                r.problems.push(Problem::new(
                    &display,
                    None,
                    format!(
                        "cannot read the target table {ts}.{tn} on the member: {}",
                        describe(&e)
                    ),
                    "grant the member role access to it".into(),
                ));
                continue;
            }
        };
        let hub_cols: Vec<&str> = t.hub.columns.iter().map(|c| c.name.as_str()).collect();
        let (map, problems) = model::map_table(rule, cfg.tables.drift, &hub_cols, &member);
        r.problems.extend(problems);
        for (h, target) in &map.columns {
            let ColumnTarget::Member(mname) = target else {
                continue;
            };
            if let (Some(hc), Some(mc)) = (t.hub.column(h), member.column(mname)) {
                if let Some(p) = model::type_problem(&display, h, (&hc.base_type, hc.category), mc)
                    .or_else(|| model::length_problem(&display, h, &hc.type_name, mc))
                {
                    r.problems.push(p);
                }
            }
        }
        let full = t.hub.replica_identity == 'f'
            || (t.hub.lacks_identity() && cfg.tables.no_key == NoKeyPolicy::ReplicaIdentityFull);
        let changes = t.ops.contains(&Operation::Update) || t.ops.contains(&Operation::Delete);
        if changes && !full {
            if let Some(p) = model::key_problem(&display, &member, &map) {
                r.problems.push(p);
            }
        }
        let p = member.privileges;
        let need = [
            (Operation::Insert, p.insert, "INSERT"),
            (Operation::Update, p.update && p.insert, "UPDATE, INSERT"),
            (Operation::Delete, p.delete, "DELETE"),
            (Operation::Truncate, p.truncate, "TRUNCATE"),
        ];
        for (op, has, grant) in need {
            if t.ops.contains(&op) && !has {
                r.problems.push(Problem::new(
                    &display,
                    None,
                    format!(
                        "the member role may not {} on {}",
                        op.as_str(),
                        member.display()
                    ),
                    format!("GRANT {grant} ON {} TO the member role", member.qualified()),
                ));
            }
        }
        if map.columns.iter().any(|(_, c)| *c == ColumnTarget::ToAdd) && !p.owner {
            r.problems.push(Problem::new(
                &display,
                None,
                format!(
                    "drift = \"add-columns\" needs to ALTER {}, which the member role does not own",
                    member.display()
                ),
                "connect as the owner, or add the columns yourself".into(),
            ));
        }
        t.member = Some(member);
        t.map = Some(map);
    }
}
