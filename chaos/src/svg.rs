//! The timeline plot of a chaos run (`timeline.svg`), drawn from a [`Report`](crate::report::Report).

use crate::report::Report;

/// The SVG document for `report`.
pub fn render(report: &Report) -> String {
    let _ = report;
    String::new()
}
