//! Grouped bar charts as SVG: one group per test (or load level), one bar per series
//! (variant, server), the median as the bar and min..max as a whisker. Each group has its own
//! scale: the groups' speeds differ by orders of magnitude, and within a group is where bars
//! are compared.

use std::fmt::Write as _;

use super::stats::Summary;

/// The bars above one label.
pub struct Group {
    pub label: String,
    /// (series index, summary), in the order drawn.
    pub bars: Vec<(usize, Summary)>,
}

const COLOURS: [&str; 8] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"];

/// The chart: `title` on top, a legend of `series`, then the groups left to right.
pub fn bars(title: &str, unit: &str, series: &[String], groups: &[Group]) -> String {
    let (w, h, pad, top) = (760.0, 380.0, 60.0, 70.0);
    let group_w = (w - 2.0 * pad) / groups.len().max(1) as f64;
    let bar_w = group_w * 0.8 / series.len().max(1) as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{pad}\" y=\"20\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    for (gi, group) in groups.iter().enumerate() {
        let max = group.bars.iter().map(|(_, sm)| sm.max).fold(0.0f64, f64::max).max(1e-9);
        let gx = pad + gi as f64 * group_w;
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>", gx + group_w / 2.0, h - 15.0, escape(&group.label));
        for (bi, (series_index, sm)) in group.bars.iter().enumerate() {
            let scale = |v: f64| (h - pad) - (v / max) * (h - pad - top);
            let x = gx + group_w * 0.1 + bi as f64 * bar_w;
            let colour = COLOURS[series_index % COLOURS.len()];
            let name = series.get(*series_index).map_or("?", String::as_str);
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\"><title>{} {}: {:.2} {unit}</title></rect>",
                scale(sm.median),
                bar_w * 0.9,
                (h - pad) - scale(sm.median),
                escape(name),
                escape(&group.label),
                sm.median
            );
            let cx = x + bar_w * 0.45;
            let _ = writeln!(s, "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>", scale(sm.min), scale(sm.max));
            let _ =
                writeln!(s, "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{:.1}</text>", scale(sm.max) - 4.0, sm.median);
        }
    }
    // The legend: one row under the title, above the bars.
    for (i, name) in series.iter().enumerate() {
        let x = pad + 120.0 * i as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{x:.1}\" y=\"32\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"41\">{}</text>",
            COLOURS[i % COLOURS.len()],
            x + 14.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(median: f64) -> Summary {
        Summary { n: 3, mean: median, sd: 0.0, median, min: median - 1.0, max: median + 1.0 }
    }

    #[test]
    fn every_bar_is_drawn_with_its_series_colour_and_labels_are_escaped() {
        let series = vec!["a<b".to_string(), "c".to_string()];
        let groups = vec![
            Group { label: "pp512".into(), bars: vec![(0, summary(100.0)), (1, summary(120.0))] },
            Group { label: "tg128".into(), bars: vec![(1, summary(10.0))] },
        ];
        let svg = bars("title & more", "t/s", &series, &groups);
        assert_eq!(svg.matches("<rect x=").count(), 3 + 2, "three bars and two legend boxes");
        assert_eq!(svg.matches(COLOURS[1]).count(), 3, "series 1: two bars and its legend box");
        assert!(svg.contains("a&lt;b") && svg.contains("title &amp; more") && !svg.contains("a<b"));
        assert!(svg.contains("<title>c tg128: 10.00 t/s</title>"));
    }
}
