//! The metric tables of `docs/contracts.md`, read back so that each binary's tests can check
//! what it registers against what the document promises: alerts, the dashboard and users'
//! queries are written against the document.

use std::collections::{BTreeMap, BTreeSet};

/// Every table row of `markdown` whose first cell is a backticked metric name starting with
/// `prefix`, mapped to the label names of its third cell: the backticked words outside
/// parentheses (inside them the document lists a label's values).
pub fn documented_metrics(markdown: &str, prefix: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut metrics = BTreeMap::new();
    for line in markdown.lines() {
        let cells: Vec<&str> = line.trim().split('|').map(str::trim).collect();
        // "| name | type | labels | meaning |" splits into 6 cells, the outer two empty.
        let (Some(name), Some(labels)) = (cells.get(1), cells.get(3)) else {
            continue;
        };
        let Some(name) = name
            .strip_prefix('`')
            .and_then(|n| n.strip_suffix('`'))
            .filter(|n| n.starts_with(prefix))
        else {
            continue;
        };
        metrics.insert(name.to_owned(), backticked(&outside_parentheses(labels)));
    }
    metrics
}

fn outside_parentheses(text: &str) -> String {
    let mut depth = 0usize;
    text.chars()
        .filter(|c| {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ => return depth == 0,
            }
            false
        })
        .collect()
}

fn backticked(text: &str) -> BTreeSet<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|word| !word.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The differences between what the code registers and what the document lists, one line
/// each; empty when they agree.
pub fn metric_differences(
    registered: &BTreeMap<String, BTreeSet<String>>,
    documented: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, labels) in registered {
        match documented.get(name) {
            None => problems.push(format!("{name} is exposed but not in docs/contracts.md")),
            Some(listed) if listed != labels => problems.push(format!(
                "{name}: the code's labels are {labels:?}, docs/contracts.md lists {listed:?}"
            )),
            Some(_) => {}
        }
    }
    for name in documented.keys().filter(|n| !registered.contains_key(*n)) {
        problems.push(format!("{name} is in docs/contracts.md but not exposed"));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
| metric | type | labels | meaning |
|---|---|---|---|
| `x_info` | gauge (1) | `version`, `node` | identity |
| `x_state` | gauge | `source`, `state` (`selected`, `combined`) | role (see `y`) |
| `x_total` | counter | | steps |
| `other_metric` | gauge | `a` | not this prefix |
";

    #[test]
    fn rows_give_names_and_labels_but_not_label_values() {
        let metrics = documented_metrics(TABLE, "x_");
        let labels = |n: &str| metrics[n].iter().cloned().collect::<Vec<_>>();
        assert_eq!(metrics.len(), 3);
        assert_eq!(labels("x_info"), ["node", "version"]);
        assert_eq!(labels("x_state"), ["source", "state"]);
        assert!(labels("x_total").is_empty());
    }

    #[test]
    fn differences_name_the_metric_and_the_side_missing_it() {
        let documented = documented_metrics(TABLE, "x_");
        let mut registered = documented.clone();
        registered.remove("x_total");
        registered.insert("x_new".into(), BTreeSet::new());
        registered.insert("x_info".into(), BTreeSet::from(["version".into()]));
        let problems = metric_differences(&registered, &documented);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("x_new is exposed but not"))
        );
        assert!(problems.iter().any(|p| p.starts_with("x_total is in docs")));
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("x_info: the code's labels"))
        );
    }
}
