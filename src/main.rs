//! `tavernsim`: the command line. Thin glue over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use tavernsim::proxy::Variant;
use tavernsim::sim::campaign::{self, CampaignSpec, NamedScenario, Report};
use tavernsim::sim::scenario::{EMBEDDED, Scenario};
use tavernsim::sim::trace::to_json_lines;
use tavernsim::sim::world::{WorldSpec, run_world};

/// Deterministic simulation harness for refresh-during-retry defects in
/// multi-user LLM chat proxies.
#[derive(Parser)]
#[command(name = "tavernsim", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run many seeded worlds against a proxy variant and report every
    /// broken invariant with the command that replays it.
    ///
    /// Exit status: 0 when no invariant broke, 1 when one did, 2 for bad
    /// usage.
    Fuzz(FuzzArgs),
    /// Run one world again and print its verdict and trace hash.
    Replay(ReplayArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Parser)]
struct FuzzArgs {
    /// Seeds to run per scenario.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    seed_start: u64,
    /// The proxy under test: fixed, sillytavern-1.12.6 or sillytavern-1.12.7.
    #[arg(long, default_value = "fixed", value_parser = parse_variant)]
    variant: Variant,
    /// A scenario name (see below) or a path to a scenario TOML file;
    /// repeat for several. Default: every embedded scenario.
    #[arg(long = "scenario", value_name = "NAME|FILE")]
    scenarios: Vec<String>,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    jobs: Option<u64>,
    /// Keep running every seed after a violation instead of stopping.
    #[arg(long)]
    keep_going: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Parser)]
struct ReplayArgs {
    /// The seed to replay.
    #[arg(long)]
    seed: u64,
    /// The scenario name or file the seed ran with.
    #[arg(long, value_name = "NAME|FILE")]
    scenario: String,
    /// The proxy variant the seed ran against.
    #[arg(long, default_value = "fixed", value_parser = parse_variant)]
    variant: Variant,
    /// Write the world's events to FILE as JSON lines.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Fail (exit 1) unless the trace hash is exactly this.
    #[arg(long, value_name = "HASH")]
    expect_hash: Option<String>,
}

fn parse_variant(s: &str) -> Result<Variant, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tavernsim: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Fuzz(args) => fuzz(args),
        Command::Replay(args) => replay(args),
    }
}

fn load_scenarios(names: &[String]) -> anyhow::Result<Vec<NamedScenario>> {
    let names: Vec<String> = if names.is_empty() {
        EMBEDDED.iter().map(|(n, _)| n.to_string()).collect()
    } else {
        names.to_vec()
    };
    names
        .into_iter()
        .map(|origin| {
            let scenario = Scenario::load(&origin).map_err(anyhow::Error::msg)?;
            Ok(NamedScenario {
                origin,
                scenario: Arc::new(scenario),
            })
        })
        .collect()
}

fn fuzz(args: FuzzArgs) -> anyhow::Result<ExitCode> {
    let scenarios = load_scenarios(&args.scenarios)?;
    let jobs = args.jobs.map(|j| j as usize).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let spec = CampaignSpec {
        scenarios,
        variant: args.variant,
        seed_start: args.seed_start,
        seeds: args.seeds,
        jobs,
        stop_on_first: !args.keep_going,
        progress: matches!(args.format, Format::Text),
    };
    let report = campaign::run(&spec);
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => print_text(&spec, &report),
    }
    if !report.harness_errors.is_empty() {
        return Ok(ExitCode::from(3));
    }
    Ok(if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_text(spec: &CampaignSpec, r: &Report) {
    let names: Vec<&str> = spec
        .scenarios
        .iter()
        .map(|s| s.scenario.name.as_str())
        .collect();
    println!(
        "variant {}: {} seeds of {} in {:.1}s ({:.1} seeds/s, {:.0} simulated seconds, {:.0}x real time)",
        r.variant,
        r.seeds_run,
        names.join(", "),
        r.wall_seconds,
        r.seeds_per_second(),
        r.sim_seconds,
        if r.wall_seconds > 0.0 {
            r.sim_seconds / r.wall_seconds
        } else {
            0.0
        },
    );
    for e in &r.harness_errors {
        println!("HARNESS ERROR {e}");
    }
    if r.violations.is_empty() {
        println!("clean: no invariant broke");
        return;
    }
    println!("{} violations:", r.violations.len());
    for v in &r.violations {
        println!(
            "\nseed {} scenario {} variant {}: {}",
            v.seed, v.scenario, r.variant, v.invariant
        );
        println!("  {}", v.message);
        println!("  replay: {}", v.replay);
    }
    if spec.stop_on_first {
        println!("\n(stopped at the first violating seed; --keep-going runs every seed)");
    }
}

fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let scenario = Scenario::load(&args.scenario).map_err(anyhow::Error::msg)?;
    let run = run_world(&WorldSpec {
        seed: args.seed,
        scenario: Arc::new(scenario),
        variant: args.variant,
    });
    if let Some(path) = &args.trace {
        std::fs::write(path, to_json_lines(&run.events))
            .with_context(|| format!("could not write the trace to {}", path.display()))?;
    }
    println!(
        "seed {} scenario {} variant {}: {} events, {:.3} simulated seconds, ended {:?}",
        args.seed,
        args.scenario,
        args.variant,
        run.events.len(),
        run.sim_ms as f64 / 1000.0,
        run.end
    );
    if let Some(e) = &run.error {
        println!("error: {e}");
    }
    if run.violations.is_empty() {
        println!("verdict: clean");
    }
    for v in &run.violations {
        println!(
            "verdict: {} at {:.3}s ({}x): {}",
            v.invariant,
            v.t_us as f64 / 1e6,
            v.count,
            v.message
        );
    }
    println!("trace hash: {}", run.trace_hash);
    if let Some(expected) = &args.expect_hash {
        if *expected != run.trace_hash {
            println!(
                "trace hash differs from the expected {expected}: this build does not replay that run exactly"
            );
            return Ok(ExitCode::from(1));
        }
        println!("trace hash matches");
    }
    Ok(if run.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
