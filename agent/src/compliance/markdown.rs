//! The report as Markdown for people: the same [`Report`] value the JSON serializes, every
//! fact of it in a table row or list item. Text from the cluster or the audit log is escaped,
//! so a hostile user name or field value cannot break a table or inject markup.

use std::fmt::Write;

use super::builder::secs;
use super::model::*;

/// Makes `text` safe inside a table cell or list item: no line breaks, no column separators,
/// no HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '|' => out.push_str("\\|"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '`' => out.push('\''),
            '\n' | '\r' => out.push(' '),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn opt_secs(v: Option<f64>) -> String {
    v.map(secs).unwrap_or_else(|| "—".into())
}

fn check_label(c: Check) -> &'static str {
    match c {
        Check::Within => "within",
        Check::Exceeded => "EXCEEDED",
        Check::Unknown => "unknown",
    }
}

fn evidence_label(k: EvidenceKind) -> &'static str {
    match k {
        EvidenceKind::ClusterState => "cluster state",
        EvidenceKind::Nodes => "node list",
        EvidenceKind::Metrics => "Prometheus metrics",
        EvidenceKind::Rbac => "RBAC",
        EvidenceKind::AuditLog => "audit log",
        EvidenceKind::Events => "operator Events",
    }
}

/// Renders the report.
pub fn render(r: &Report) -> String {
    let mut o = String::new();
    // `write!` to a String cannot fail.
    let _ = render_into(&mut o, r);
    o
}

fn render_into(o: &mut String, r: &Report) -> std::fmt::Result {
    writeln!(o, "# Time synchronization compliance report\n")?;
    writeln!(
        o,
        "Period: {} to {}. Generated {}. Report version {}.\n",
        escape(&r.period.since),
        escape(&r.period.until),
        escape(&r.generated_at),
        r.report_version
    )?;

    writeln!(o, "## Verdicts\n")?;
    writeln!(o, "| Control | Verdict | Evidence used |")?;
    writeln!(o, "|---|---|---|")?;
    for c in &r.controls {
        writeln!(
            o,
            "| {} | **{}** | {} |",
            escape(&c.control),
            c.verdict.label(),
            c.evidence
                .iter()
                .map(|k| evidence_label(*k))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    writeln!(o)?;
    for c in &r.controls {
        writeln!(o, "### {}: {}\n", escape(&c.control), c.verdict.label())?;
        writeln!(o, "{}\n", escape(&c.requirement))?;
        for reason in &c.reasons {
            writeln!(o, "- {}", escape(reason))?;
        }
        writeln!(o)?;
    }

    writeln!(o, "## Evidence\n")?;
    writeln!(o, "| Evidence | Available | Detail |")?;
    writeln!(o, "|---|---|---|")?;
    for e in &r.evidence {
        writeln!(
            o,
            "| {} | {} | {} |",
            evidence_label(e.kind),
            if e.available { "yes" } else { "**missing**" },
            escape(&e.detail)
        )?;
    }
    writeln!(o)?;

    writeln!(o, "## Sources\n")?;
    writeln!(
        o,
        "| TimeService | Designated upstreams | Egress tier | Fallback to upstreams |"
    )?;
    writeln!(o, "|---|---|---|---|")?;
    for d in &r.sources.designated {
        writeln!(
            o,
            "| {} | {} | {} | {} |",
            escape(&d.time_service),
            escape(&d.upstreams.join(", ")),
            if d.egress_nodes.is_empty() {
                "—".to_owned()
            } else {
                escape(&d.egress_nodes.join(", "))
            },
            if d.fallback_to_upstreams { "yes" } else { "no" }
        )?;
    }
    writeln!(o)?;
    writeln!(
        o,
        "| Node | TimeService | Traced | Reference chain | Not designated | Problem |"
    )?;
    writeln!(o, "|---|---|---|---|---|---|")?;
    for n in &r.sources.nodes {
        writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            escape(&n.node),
            escape(&n.time_service),
            if n.traced { "yes" } else { "**no**" },
            escape(&n.chain.join(" → ")),
            escape(&n.undesignated_sources.join("; ")),
            escape(n.problem.as_deref().unwrap_or(""))
        )?;
    }
    writeln!(o)?;
    for (title, list) in [
        (
            "Nodes taking time from sources that are not designated",
            &r.sources.not_designated,
        ),
        ("Nodes whose chain could not be traced", &r.sources.untraced),
        ("Nodes without a Stratum agent", &r.sources.without_agent),
    ] {
        if !list.is_empty() {
            writeln!(o, "{title}:\n")?;
            for n in list {
                writeln!(o, "- {}", escape(n))?;
            }
            writeln!(o)?;
        }
    }

    writeln!(o, "## Accuracy\n")?;
    match r.accuracy.basis {
        AccuracyBasis::Period => writeln!(
            o,
            "Over the whole period, from {}. Allowed unsynchronized time per node: {}.\n",
            escape(&r.accuracy.source),
            secs(r.accuracy.allowed_unsynchronized_seconds)
        )?,
        AccuracyBasis::PointInTime => writeln!(
            o,
            "**Point in time**: no Prometheus was given, so these are the NodeClocks as they are now ({}); they say nothing about the rest of the period.\n",
            escape(&r.accuracy.source)
        )?,
    }
    writeln!(
        o,
        "| Node | TimeService | Max abs offset | Max root distance | Unsynchronized | Unreported | Bound | Bound from | Check | Reason |"
    )?;
    writeln!(o, "|---|---|---|---|---|---|---|---|---|---|")?;
    for n in &r.accuracy.nodes {
        writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            escape(&n.node),
            escape(&n.time_service),
            opt_secs(n.max_abs_offset_seconds),
            opt_secs(n.max_root_distance_seconds),
            opt_secs(n.unsynchronized_seconds),
            opt_secs(n.unreported_seconds),
            opt_secs(n.bound_seconds),
            escape(&n.bound_from),
            check_label(n.check),
            escape(&n.reason)
        )?;
    }
    writeln!(o)?;
    if !r.accuracy.queries.is_empty() {
        writeln!(o, "Queries (evaluated at the period's end):\n")?;
        for q in &r.accuracy.queries {
            writeln!(o, "- {}", escape(q))?;
        }
        writeln!(o)?;
    }

    writeln!(o, "## Tenants\n")?;
    writeln!(
        o,
        "| Tenant | TimeService | Service | Port | Allow list CIDRs | Ready endpoints | Max root distance | Authentication | Served | Refused |"
    )?;
    writeln!(o, "|---|---|---|---|---|---|---|---|---|---|")?;
    for t in &r.tenants {
        let n = |v: Option<u64>| v.map_or_else(|| "—".to_owned(), |v| v.to_string());
        writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            escape(&t.tenant),
            escape(t.time_service.as_deref().unwrap_or("—")),
            escape(&t.service),
            t.port.map_or_else(|| "—".to_owned(), |p| p.to_string()),
            t.allow_list_size,
            t.ready_endpoints,
            opt_secs(t.max_root_distance_seconds),
            escape(&t.authentication),
            n(t.served),
            n(t.refused)
        )?;
    }
    writeln!(o)?;

    writeln!(o, "## Access\n")?;
    if r.access.evidenced {
        writeln!(
            o,
            "Principals who may create, update, patch or delete TimeServices or TenantTimePolicies:\n"
        )?;
        writeln!(
            o,
            "| Principal | Kind | Resource | Verbs | Scope | Only objects | Via |"
        )?;
        writeln!(o, "|---|---|---|---|---|---|---|")?;
        for p in &r.access.principals {
            for g in &p.grants {
                writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    escape(&p.name),
                    escape(&p.kind),
                    escape(&g.resource),
                    escape(&g.verbs.join(", ")),
                    escape(&g.scope),
                    escape(&g.resource_names.join(", ")),
                    escape(&g.via)
                )?;
            }
        }
        writeln!(o)?;
    } else {
        writeln!(
            o,
            "**Not evidenced**: roles and bindings were not readable.\n"
        )?;
    }
    for n in &r.access.notes {
        writeln!(o, "- {}", escape(n))?;
    }
    writeln!(o)?;

    writeln!(o, "## Changes\n")?;
    let c = &r.changes;
    match c.source {
        ChangeSource::AuditLog => writeln!(
            o,
            "From the API server's audit log: {} line(s) read, {} change(s) in the period, {} outside it, {} other event(s) ignored, {} line(s) unreadable.\n",
            c.lines_read,
            c.records.len(),
            c.outside_period,
            c.ignored,
            c.problems.len() + c.problems_omitted
        )?,
        ChangeSource::Events => writeln!(
            o,
            "**No audit log**: from the operator's Events, which name no user and expire; {} in the period.\n",
            c.records.len()
        )?,
        ChangeSource::None => writeln!(o, "**Not evidenced**: no audit log and no Events.\n")?,
    }
    writeln!(
        o,
        "| Time | User | Verb | Object | Outcome | Field | Old | New |"
    )?;
    writeln!(o, "|---|---|---|---|---|---|---|---|")?;
    for rec in &c.records {
        let user = match &rec.impersonated_user {
            Some(as_) => format!("{} (as {as_})", rec.user),
            None if rec.user.is_empty() => "(not recorded)".to_owned(),
            None => rec.user.clone(),
        };
        let object = match &rec.namespace {
            Some(ns) => format!("{} {ns}/{}", rec.kind, rec.name),
            None => format!("{} {}", rec.kind, rec.name),
        };
        let outcome = match &rec.outcome {
            ChangeOutcome::Applied => "applied".to_owned(),
            ChangeOutcome::Refused { code, reason } => {
                format!("**REFUSED** {code} {reason}").trim_end().to_owned()
            }
            ChangeOutcome::Observed => "observed".to_owned(),
        };
        let head = format!(
            "| {} | {} | {} | {} | {} ",
            escape(&rec.time),
            escape(&user),
            escape(&rec.verb),
            escape(&object),
            escape(&outcome)
        );
        if rec.fields.is_empty() {
            writeln!(
                o,
                "{head}| — | | {} |",
                escape(rec.note.as_deref().unwrap_or(""))
            )?;
        }
        for f in &rec.fields {
            writeln!(
                o,
                "{head}| {} | {} | {} |",
                escape(&f.path),
                escape(f.old.as_deref().unwrap_or(match rec.baseline {
                    Baseline::Unknown => "(unknown)",
                    _ => "(absent)",
                })),
                escape(f.new.as_deref().unwrap_or("(removed)"))
            )?;
        }
        if rec.fields_omitted > 0 {
            writeln!(o, "{head}| … {} more field(s) | | |", rec.fields_omitted)?;
        }
    }
    writeln!(o)?;
    if !c.problems.is_empty() {
        writeln!(o, "Unreadable audit log lines:\n")?;
        writeln!(o, "| Line | Problem |")?;
        writeln!(o, "|---|---|")?;
        for p in &c.problems {
            writeln!(o, "| {} | {} |", p.line, escape(&p.message))?;
        }
        if c.problems_omitted > 0 {
            writeln!(o, "| … | {} more |", c.problems_omitted)?;
        }
        writeln!(o)?;
    }
    Ok(())
}
