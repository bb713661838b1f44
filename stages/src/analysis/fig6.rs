//! `fig6_table`: the paper's Fig. 6 from `segment_eval` summaries, one row per regime and
//! label fraction, mean ± sample standard deviation over the seeds (the stages listed for
//! the regime).

use std::collections::BTreeMap;

use meduet_engine::{StageContext, StageError};

use crate::analysis::stats::Spread;
use crate::kinds::controlnet::{Fig6Row, Fig6TableParams};
use crate::segmentation::splits::LabelFraction;

/// Shots first, then percentages ascending.
fn fraction_order(f: &str) -> (u8, f64) {
    match LabelFraction::parse(f) {
        Ok(LabelFraction::Shots(k)) => (0, k as f64),
        Ok(LabelFraction::Fraction(x)) => (1, x),
        Err(_) => (2, 0.0),
    }
}

/// The four numbers of a summary: Dice and HD95, in-domain and unseen.
fn numbers(s: &serde_json::Value) -> [Option<f64>; 4] {
    let f = |set: &str, m: &str| s[set]["foreground_mean"][m].as_f64();
    [
        f("in_domain", "Dice"),
        f("in_domain", "HD95"),
        f("unseen_domain", "Dice"),
        f("unseen_domain", "HD95"),
    ]
}

/// Groups the reports by regime (as `p.regimes` names their stages) and label fraction.
pub fn rows(
    p: &Fig6TableParams,
    reports: &[(String, serde_json::Value)],
) -> Result<Vec<Fig6Row>, String> {
    let regime_of: BTreeMap<&str, &str> = p
        .regimes
        .iter()
        .flat_map(|(r, stages)| stages.iter().map(move |s| (s.as_str(), r.as_str())))
        .collect();
    for (r, stages) in &p.regimes {
        for s in stages {
            if !reports.iter().any(|(n, _)| n == s) {
                return Err(format!(
                    "regimes.{r}: '{s}' is not among the 'reports' inputs (connect its report)"
                ));
            }
        }
    }
    let mut groups: BTreeMap<(String, String), Vec<[Option<f64>; 4]>> = BTreeMap::new();
    for (stage, s) in reports {
        let regime = regime_of.get(stage.as_str()).ok_or_else(|| {
            format!("report of '{stage}' belongs to no regime: list it in `regimes`")
        })?;
        let fraction = s["label_fraction"].as_str().unwrap_or("?").to_string();
        groups
            .entry((regime.to_string(), fraction))
            .or_default()
            .push(numbers(s));
    }
    let mut out: Vec<Fig6Row> = groups
        .into_iter()
        .map(|((regime, label_fraction), v)| {
            let col = |i: usize| -> Spread {
                Spread::of(&v.iter().filter_map(|n| n[i]).collect::<Vec<_>>())
            };
            Fig6Row {
                regime,
                label_fraction,
                seeds: v.len(),
                dice_in_domain: col(0),
                hd95_in_domain: col(1),
                dice_unseen: col(2),
                hd95_unseen: col(3),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        fraction_order(&a.label_fraction)
            .partial_cmp(&fraction_order(&b.label_fraction))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.regime.cmp(&b.regime))
    });
    Ok(out)
}

/// The Markdown table.
pub fn markdown(title: &str, rows: &[Fig6Row]) -> String {
    let mut md = format!(
        "# {title}\n\nMean foreground Dice and HD95 (mm), mean ± sd over seeds.\n\n\
         | label fraction | regime | seeds | Dice in-domain | HD95 in-domain | Dice held-out domain | HD95 held-out domain |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.label_fraction,
            r.regime,
            r.seeds,
            r.dice_in_domain.text(3),
            r.hd95_in_domain.text(1),
            r.dice_unseen.text(3),
            r.hd95_unseen.text(1)
        ));
    }
    md
}

/// The CSV table (one line per row; empty cells for undefined values).
pub fn csv(rows: &[Fig6Row]) -> String {
    let mut s = String::from(
        "label_fraction,regime,seeds,dice_in_domain,dice_in_domain_sd,hd95_in_domain,hd95_in_domain_sd,dice_unseen,dice_unseen_sd,hd95_unseen,hd95_unseen_sd\n",
    );
    let c = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.6}"));
    for r in rows {
        s.push_str(&format!("{},{},{}", r.label_fraction, r.regime, r.seeds));
        for v in [
            &r.dice_in_domain,
            &r.hd95_in_domain,
            &r.dice_unseen,
            &r.hd95_unseen,
        ] {
            s.push_str(&format!(",{},{}", c(v.mean), c(v.sd)));
        }
        s.push('\n');
    }
    s
}

pub fn run(p: &Fig6TableParams, ctx: &mut StageContext) -> Result<(), StageError> {
    let mut reports = Vec::new();
    for r in ctx.inputs("reports") {
        let path = r.dir.join("summary.json");
        let bytes = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
        let s: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| StageError::input(format!("'{}': {e}", path.display())))?;
        if !s["in_domain"].is_object() {
            return Err(StageError::input(format!(
                "'{}': not a segment_eval summary (no 'in_domain')",
                path.display()
            )));
        }
        reports.push((r.stage.clone(), s));
    }
    let rows = rows(p, &reports).map_err(StageError::input)?;
    let title = p
        .title
        .clone()
        .unwrap_or_else(|| "Fig. 6: segmentation with synthetic training pairs".into());
    let out = ctx.output_dir("table")?;
    for (name, text) in [
        ("table.md", markdown(&title, &rows)),
        ("table.csv", csv(&rows)),
    ] {
        std::fs::write(out.join(name), text).map_err(|e| StageError::io(&out.join(name), e))?;
    }
    let rows_json = serde_json::to_string_pretty(&rows).expect("json");
    std::fs::write(out.join("rows.json"), rows_json)
        .map_err(|e| StageError::io(&out.join("rows.json"), e))?;
    // Bars: groups = label fraction x setting, series = regimes.
    let mut regimes: Vec<String> = rows.iter().map(|r| r.regime.clone()).collect();
    regimes.sort();
    regimes.dedup();
    let mut fractions: Vec<String> = Vec::new();
    for r in &rows {
        if !fractions.contains(&r.label_fraction) {
            fractions.push(r.label_fraction.clone());
        }
    }
    let (mut groups, mut values) = (Vec::new(), Vec::new());
    for f in &fractions {
        for (setting, unseen) in [("in-domain", false), ("held-out domain", true)] {
            groups.push(format!("{f} {setting}"));
            values.push(
                regimes
                    .iter()
                    .map(|g| {
                        rows.iter()
                            .find(|r| &r.regime == g && &r.label_fraction == f)
                            .and_then(|r| {
                                if unseen {
                                    r.dice_unseen.mean
                                } else {
                                    r.dice_in_domain.mean
                                }
                            })
                            .unwrap_or(0.0)
                    })
                    .collect(),
            );
        }
    }
    crate::plot::bar_chart(
        &out.join("dice.png"),
        &title,
        "mean foreground Dice (mean over seeds)",
        &groups,
        &regimes,
        &values,
    )
    .map_err(|e| StageError::failed(e.to_string()))?;
    ctx.set_metric("rows", rows.len());
    for r in &rows {
        if let Some(m) = r.dice_in_domain.mean {
            ctx.set_metric(&format!("dice_{}_{}", r.regime, r.label_fraction), m);
        }
    }
    tracing::info!("{} rows: {}", rows.len(), out.join("table.md").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(fraction: &str, dice: f64, unseen: Option<f64>) -> serde_json::Value {
        serde_json::json!({
            "label_fraction": fraction,
            "in_domain": { "foreground_mean": { "Dice": dice, "HD95": 10.0 * dice } },
            "unseen_domain": { "foreground_mean": { "Dice": unseen } },
        })
    }

    #[test]
    fn regimes_are_averaged_over_seeds_with_their_spread() {
        let mut regimes = BTreeMap::new();
        regimes.insert("R1".to_string(), vec!["a0".into(), "a1".into()]);
        regimes.insert(
            "R3".to_string(),
            vec!["b0".into(), "b1".into(), "c0".into()],
        );
        let p = Fig6TableParams {
            title: None,
            regimes,
        };
        let reports = vec![
            ("a0".to_string(), summary("10%", 0.5, Some(0.2))),
            ("a1".to_string(), summary("10%", 0.7, None)),
            ("b0".to_string(), summary("10%", 0.6, Some(0.4))),
            ("b1".to_string(), summary("10%", 0.8, Some(0.6))),
            ("c0".to_string(), summary("100%", 0.9, Some(0.7))),
        ];
        let r = rows(&p, &reports).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(
            (r[0].regime.as_str(), r[0].label_fraction.as_str()),
            ("R1", "10%")
        );
        assert!((r[0].dice_in_domain.mean.unwrap() - 0.6).abs() < 1e-12);
        assert!((r[0].dice_in_domain.sd.unwrap() - 0.02f64.sqrt()).abs() < 1e-12);
        // One seed had no unseen-domain value: the mean is of the other, no spread.
        assert_eq!(r[0].dice_unseen.n, 1);
        assert_eq!(r[0].dice_unseen.sd, None);
        assert_eq!(r[2].label_fraction, "100%");
        assert_eq!(r[2].seeds, 1);
        let md = markdown("t", &r);
        assert!(md.contains("| 10% | R3 | 2 | 0.700 ± 0.141 |"), "{md}");
        assert_eq!(csv(&r).lines().count(), 4);
        // A listed stage without a report, and a report of no regime, are errors.
        let e = rows(&p, &reports[..4]).unwrap_err();
        assert!(e.contains("regimes.R3: 'c0'"), "{e}");
        let mut extra = reports.clone();
        extra.push(("z".into(), summary("10%", 0.1, None)));
        assert!(rows(&p, &extra)
            .unwrap_err()
            .contains("'z' belongs to no regime"));
    }
}
