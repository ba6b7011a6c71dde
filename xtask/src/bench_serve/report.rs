//! bench-serve's report: a table per scenario (aggregate tokens/s with its paired interval
//! against the reference server, latencies, prompt reuse, peak memory), the multi-turn latency
//! by turn, the samples as CSV and a chart.

use std::path::Path;
use std::time::Duration;

use super::ceiling::Ceiling;
use super::load::{LevelResult, percentile};
use super::scenario::{Scenario, TURNS};
use super::{Args, Contender, Sample};
use crate::bench::stats;

/// A finished run, as the report reads it.
pub(super) struct Run<'a> {
    pub args: &'a Args,
    pub model: &'a Path,
    pub samples: &'a [Sample],
    pub servers: &'a [Contender],
    pub reference: Contender,
    pub took: Duration,
    pub builds: &'a serde_json::Value,
    pub template: String,
    /// llama-batched-bench's aggregate for the distinct scenario's levels.
    pub ceilings: &'a [Ceiling],
}

impl Run<'_> {
    /// The samples of `server` in `scenario` at `clients`, over the rounds.
    fn levels(&self, server: Contender, scenario: Scenario, clients: usize) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.server == server && s.level.scenario == scenario && s.level.concurrency == clients)
    }

    pub fn markdown(&self) -> String {
        let args = self.args;
        let machine = crate::bench::machine::describe();
        let machine =
            format!("{}, {} cores, {}, {:.1} GB/s memory read", machine.cpu, machine.cores, machine.simd.join(" "), machine.memory_read_gb_s);
        let scenarios: Vec<&str> = args.scenario.iter().map(|s| s.name()).collect();
        let mut md = format!(
            "# bench-serve\n\nCommand: `cargo xtask bench-serve` ({} rounds, scenarios {}, distinct at {:?} clients, {} slots, {} conversations per client, \
             replies of {} (ignore_eos, counted from usage), ctx {}, KV cache {})\n\
             Model: {}\nMachine: {}\nChat template: the same for both servers (llama-server: {}), checked by a probe before the run.\n{}Took {:.1} min.\n",
            args.rounds,
            scenarios.join(", "),
            args.concurrency,
            args.slots,
            args.per_client,
            args.replies().describe(),
            args.ctx,
            args.cache_type.as_deref().unwrap_or("f16"),
            self.model.display(),
            machine,
            self.template,
            args.baseline_rev.as_ref().map_or(String::new(), |rev| format!("Baseline: exsa serve as of `{rev}`.\n")),
            self.took.as_secs_f64() / 60.0,
        );
        for &scenario in &args.scenario {
            md += &format!(
                "\n## {}\n\n| clients | server | aggregate t/s (median) | vs {} [95% CI] | req/s | TTFT p50 / p99 ms | inter-token p50 / p99 ms | prompt tokens p50 (cached p50) | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|\n",
                scenario.name(),
                self.reference.name()
            );
            for clients in scenario.levels(&args.concurrency) {
                for &server in self.servers.iter().rev() {
                    md += &self.row(scenario, clients, server);
                }
                if scenario == Scenario::Distinct {
                    md += &self.ceiling_row(clients);
                }
            }
            if scenario == Scenario::MultiTurn {
                md += &self.by_turn(scenario);
            }
        }
        md += &format!("\nBuilds:\n- exsa serve: `{}`\n", self.builds["exsa serve"]);
        if self.servers.contains(&Contender::ExsaBaseline) {
            md += &format!("- exsa serve @baseline: `{}`\n", self.builds["exsa serve @baseline"]);
        }
        if self.servers.contains(&Contender::LlamaServer) {
            md += &format!("- llama-server: `{}`\n", self.builds["llama-server"].as_str().unwrap_or("?").replace('\n', " / "));
        }
        md
    }

    /// `server`'s aggregate tokens/s in `scenario` at `clients`, round by round (None where a
    /// round has none), as the paired ratios take them.
    fn per_round(&self, server: Contender, scenario: Scenario, clients: usize) -> Vec<Option<f64>> {
        (0..self.args.rounds).map(|r| self.levels(server, scenario, clients).find(|s| s.round == r).map(|s| s.level.tokens_per_s())).collect()
    }

    fn row(&self, scenario: Scenario, clients: usize, server: Contender) -> String {
        let per_round = |server: Contender| self.per_round(server, scenario, clients);
        let levels: Vec<&LevelResult> = self.levels(server, scenario, clients).map(|s| &s.level).collect();
        let median = |xs: &[f64]| stats::summarize(xs).map_or(f64::NAN, |s| s.median);
        let tps: Vec<f64> = levels.iter().map(|l| l.tokens_per_s()).collect();
        let rps: Vec<f64> = levels.iter().map(|l| l.requests_per_s()).collect();
        let ttft: Vec<f64> = levels.iter().flat_map(|l| l.ttft_ms()).collect();
        let gaps: Vec<f64> = levels.iter().flat_map(|l| l.gaps_ms()).collect();
        let prompt: Vec<f64> = levels.iter().flat_map(|l| l.requests.iter().map(|r| r.prompt_tokens as f64)).collect();
        let cached: Vec<f64> = levels.iter().flat_map(|l| l.requests.iter().filter_map(|r| r.cached_tokens.map(|c| c as f64))).collect();
        let rss: Vec<f64> = self.levels(server, scenario, clients).filter_map(|s| s.peak_rss_mib).collect();
        let vs = if server == self.reference {
            "baseline".to_string()
        } else {
            match stats::paired_ratio(&per_round(server), &per_round(self.reference)) {
                Some(r) => format!("{:.3} [{:.3}, {:.3}] {}", r.ratio, r.ci_low, r.ci_high, r.verdict),
                None => "n/a".into(),
            }
        };
        let cached = if cached.is_empty() { "-".to_string() } else { format!("{:.0}", percentile(&cached, 50.0)) };
        format!(
            "| {clients} | {} | {:.1} | {vs} | {:.2} | {:.0} / {:.0} | {:.1} / {:.1} | {:.0} ({cached}) | {:.0} |\n",
            server.name(),
            median(&tps),
            median(&rps),
            percentile(&ttft, 50.0),
            percentile(&ttft, 99.0),
            percentile(&gaps, 50.0),
            percentile(&gaps, 99.0),
            percentile(&prompt, 50.0),
            median(&rss),
        )
    }

    /// llama-batched-bench at `clients` sequences, and exsa's aggregate as a share of it.
    fn ceiling_row(&self, clients: usize) -> String {
        let rounds: Vec<&Ceiling> = self.ceilings.iter().filter(|c| c.sequences == clients).collect();
        if rounds.is_empty() {
            return String::new();
        }
        let ceiling: Vec<Option<f64>> = (0..self.args.rounds).map(|r| rounds.iter().find(|c| c.round == r).map(|c| c.tokens_per_s)).collect();
        let exsa = self.per_round(Contender::Exsa, Scenario::Distinct, clients);
        let tps: Vec<f64> = ceiling.iter().flatten().copied().collect();
        let share = match stats::paired_ratio(&exsa, &ceiling) {
            Some(r) => format!("exsa serve at {:.3} [{:.3}, {:.3}] of it", r.ratio, r.ci_low, r.ci_high),
            None => "n/a".into(),
        };
        format!(
            "| {clients} | llama-batched-bench (ceiling: kernels only) | {:.1} | {share} | - | - | - | {} | - |\n",
            stats::summarize(&tps).map_or(f64::NAN, |s| s.median),
            rounds[0].prompt_tokens
        )
    }

    /// TTFT by turn: does it stay flat as the history grows (the cache reused)?
    fn by_turn(&self, scenario: Scenario) -> String {
        let turns: String = (1..=TURNS).map(|t| format!(" turn {t} |")).collect();
        let mut md =
            format!("\nTTFT p50 ms by turn (prompt tokens p50 / cached p50):\n\n| clients | server |{turns}\n|---|---|{}\n", "---|".repeat(TURNS));
        for clients in scenario.levels(&self.args.concurrency) {
            for &server in self.servers.iter().rev() {
                md += &format!("| {clients} | {} |", server.name());
                for turn in 0..TURNS {
                    let requests: Vec<_> =
                        self.levels(server, scenario, clients).flat_map(|s| s.level.requests.iter().filter(|r| r.turn == turn)).collect();
                    let ttft: Vec<f64> = requests.iter().map(|r| r.ttft_ms).collect();
                    let prompt: Vec<f64> = requests.iter().map(|r| r.prompt_tokens as f64).collect();
                    let cached: Vec<f64> = requests.iter().filter_map(|r| r.cached_tokens.map(|c| c as f64)).collect();
                    md += &format!(" {:.0} ({:.0} / {:.0}) |", percentile(&ttft, 50.0), percentile(&prompt, 50.0), percentile(&cached, 50.0));
                }
                md += "\n";
            }
        }
        md
    }

    pub fn csv(&self) -> String {
        let mut out = String::from("round,server,scenario,concurrency,wall_s,tokens,tokens_per_s,requests,ttft_p50_ms,ttft_p99_ms,peak_rss_mib\n");
        for s in self.samples {
            let l = &s.level;
            let tokens: usize = l.requests.iter().map(|r| r.tokens).sum();
            out += &format!(
                "{},{},{},{},{:.3},{tokens},{:.2},{},{:.1},{:.1},{}\n",
                s.round,
                s.server.name(),
                l.scenario.name(),
                l.concurrency,
                l.wall_s,
                l.tokens_per_s(),
                l.requests.len(),
                percentile(&l.ttft_ms(), 50.0),
                percentile(&l.ttft_ms(), 99.0),
                s.peak_rss_mib.map_or(String::new(), |m| format!("{m:.1}")),
            );
        }
        out
    }

    /// Aggregate tokens/s per scenario, level and server, over the rounds.
    pub fn svg(&self) -> String {
        use crate::bench::chart;
        let series: Vec<String> = self.servers.iter().map(|s| s.name().to_string()).collect();
        let groups: Vec<chart::Group> = self
            .args
            .scenario
            .iter()
            .flat_map(|&scenario| scenario.levels(&self.args.concurrency).into_iter().map(move |c| (scenario, c)))
            .map(|(scenario, clients)| chart::Group {
                label: format!("{} x{clients}", scenario.name()),
                bars: self
                    .servers
                    .iter()
                    .enumerate()
                    .filter_map(|(i, &server)| {
                        let tps: Vec<f64> = self.levels(server, scenario, clients).map(|s| s.level.tokens_per_s()).collect();
                        Some((i, stats::summarize(&tps)?))
                    })
                    .collect(),
            })
            .collect();
        chart::bars("aggregate generated tokens/s by scenario and clients (median, whiskers min..max)", "t/s", &series, &groups)
    }
}
