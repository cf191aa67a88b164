//! What `check --cluster` prints: a table for people, JSON for programs.

use serde::Serialize;

use super::plan::{Check, Finding, View};

/// The result of a round.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Pod specs checked.
    pub workloads: usize,
    /// Image uses checked.
    pub images: usize,
    /// Distinct (image, credential) resolutions sent.
    pub resolutions: usize,
    /// Every image use that would not pull, or whose pull cannot be told.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Sums up a round, findings sorted by namespace, workload and container.
    pub fn new(view: &View, checks: &[Check], resolutions: usize, mut findings: Vec<Finding>) -> Self {
        findings.sort_by(|a, b| a.target.cmp(&b.target));
        Self {
            workloads: view.workloads.len(),
            images: checks.len(),
            resolutions,
            findings,
        }
    }

    /// A table, one row per finding, and a summary line.
    pub fn table(&self) -> String {
        let header = ["NAMESPACE", "WORKLOAD", "CONTAINER", "IMAGE", "REASON"];
        let rows: Vec<[String; 5]> = self
            .findings
            .iter()
            .map(|f| {
                let t = &f.target;
                [
                    t.namespace.clone(),
                    format!("{}/{}", t.kind.as_str(), t.name),
                    format!("{} ({})", t.container, t.container_kind.as_str()),
                    t.image.clone(),
                    f.reason.clone(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let line = |cells: &[&str]| {
            let mut s = String::new();
            for (c, w) in cells.iter().zip(widths) {
                s.push_str(&format!("{c:<w$}  "));
            }
            s.trim_end().to_owned() + "\n"
        };
        let mut out = String::new();
        if !rows.is_empty() {
            out.push_str(&line(&header));
            for (r, f) in rows.iter().zip(&self.findings) {
                out.push_str(&line(&r.each_ref().map(String::as_str)));
                out.push_str(&format!("    {}\n", f.message));
            }
        }
        out.push_str(&format!(
            "{} of {} images in {} workloads would not pull or could not be checked ({} resolutions)\n",
            self.findings.len(),
            self.images,
            self.workloads,
            self.resolutions
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::images::{ContainerKind, WorkloadKind};
    use crate::workload::plan::Target;

    #[test]
    fn the_table_names_workload_container_and_reason() {
        let f = Finding {
            target: Target {
                namespace: "shop".into(),
                kind: WorkloadKind::CronJob,
                name: "nightly".into(),
                container: "report".into(),
                container_kind: ContainerKind::InitContainer,
                image: "reg.example.com/report:v1".into(),
            },
            verdict: "Unpullable",
            reason: "NotFound".into(),
            message: "reg.example.com/report:v1 was not found".into(),
            credentials: vec![],
        };
        let r = Report {
            workloads: 3,
            images: 4,
            resolutions: 2,
            findings: vec![f],
        };
        let t = r.table();
        assert!(t.starts_with("NAMESPACE"), "{t}");
        assert!(
            t.contains("CronJob/nightly") && t.contains("report (initContainer)") && t.contains("NotFound"),
            "{t}"
        );
        assert!(t.contains("1 of 4 images in 3 workloads"), "{t}");
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["findings"][0]["containerKind"], "initContainer");
        assert_eq!(json["findings"][0]["kind"], "CronJob");
        assert_eq!(json["findings"][0]["reason"], "NotFound");
        assert_eq!(json["findings"][0]["namespace"], "shop");
        assert_eq!(json["findings"][0]["image"], "reg.example.com/report:v1");
        assert_eq!(json["resolutions"], 2);
    }
}
