//! `tavernsim`: the command line. Thin glue over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use tavernsim::proxy::Variant;
use tavernsim::sim::artifacts::{ArtifactOptions, save_findings};
use tavernsim::sim::campaign::{self, CampaignSpec, NamedScenario, Report, Shard};
use tavernsim::sim::scenario::{EMBEDDED, Scenario};
use tavernsim::sim::schedule::{SavedSchedule, ShrinkBudget};
use tavernsim::sim::trace::to_json_lines;
use tavernsim::sim::world::{WorldSpec, run_world};

/// Prints a line to stdout; a closed pipe (`| head`) ends the program
/// quietly instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

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
    /// usage, 3 when the harness itself failed on a seed.
    #[command(after_help = FUZZ_AFTER_HELP)]
    Fuzz(FuzzArgs),
    /// Run one world again (a saved schedule, or a seed of a scenario) and
    /// print its verdict and trace hash.
    Replay(ReplayArgs),
    /// Combine the JSON reports of a campaign's shards (`fuzz --shard I/N
    /// --format json`) into one report. Exit status as for fuzz.
    Merge(MergeArgs),
    /// Print what the proxy decides for one upstream answer (or for every
    /// case of a fixtures file), as JSON:
    /// {"decision":"retry"|"backoff"|"give-up"|"success","wait_ms":N|null,"reason":"..."}
    Classify(ClassifyArgs),
    /// Drive any running proxy like refreshing browsers, over real sockets,
    /// with the mock upstream in this process; judge what is visible from
    /// outside. Exit status as for fuzz.
    #[command(after_help = PROBE_AFTER_HELP)]
    Probe(ProbeArgs),
    /// Serve the mock upstream on real sockets (the same scripts as in the
    /// simulation), logging every attempt.
    MockUpstream(MockUpstreamArgs),
    /// Run the multi-user proxy on real sockets: from a TOML config file,
    /// or `--demo` with a mock upstream in-process. Logs go to stderr
    /// (RUST_LOG honoured, default "info,tavernsim::ev=warn").
    #[command(after_help = SERVE_AFTER_HELP)]
    Serve(ServeArgs),
    /// Read a password from the first line of stdin and print its argon2id
    /// hash, for a `password_hash` in a users file (how the first admin
    /// gets a password).
    HashPassword,
    /// Measure what the proxy costs on loopback, or what the harness costs.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run every mutant (a deliberate defect of the fixed proxy) until the
    /// invariant it breaks fires, the fixed proxy beside them, and measure
    /// the faithful SillyTavern variants; print the kill table.
    ///
    /// Exit status: 0 when every mutant is killed and the fixed proxy is
    /// clean, 1 otherwise, 2 for bad usage.
    #[command(after_help = MUTANTS_AFTER_HELP)]
    Mutants(MutantsArgs),
}

const MUTANTS_AFTER_HELP: &str = "Each mutant runs against the scenario aimed at it (embedded, or aimed: logout-during-retry, \
refresh-during-attempt) and is killed only when its target invariant fires. The fixed proxy runs \
the same scenarios, every seed. JSON: {\"mutants\":[{\"name\",\"killed\",\"invariant\",\"seeds_to_kill\",\
\"wall_seconds\",...}],\"fixed\":{\"seeds_run\",\"violations\",...},\"median_seeds_to_kill\",\"faithful\"}.";

#[derive(Parser)]
struct MutantsArgs {
    /// Seed budget per mutant (and per scenario for the fixed run and the measurements).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    seeds: u64,
    /// Wall-time budget in seconds per mutant (and for the fixed run); a
    /// mutant not killed in it survives.
    #[arg(long, value_name = "SECONDS")]
    time: Option<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    jobs: Option<u64>,
    /// Run only this mutant; repeatable.
    #[arg(long = "mutant", value_name = "NAME", value_parser = parse_variant)]
    mutants: Vec<Variant>,
    /// Skip measuring the faithful SillyTavern variants.
    #[arg(long)]
    no_measure: bool,
    /// List the mutants with their target invariant and race, and exit.
    #[arg(long)]
    list: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Requests per second and p50/p99 latency through the proxy and
    /// directly against the same mock upstream (no delay, no 429s), in one
    /// run, plus memory per in-flight request. Every phase is bounded in
    /// requests and time.
    Proxy(BenchProxyArgs),
    /// What a seed of the harness costs: seeds per second per core, time
    /// compression, and wall time against a bare turmoil world making the
    /// same HTTP exchanges with no proxy logic, in one run (the default
    /// scenarios, the fixed variant).
    Sim(BenchSimArgs),
}

#[derive(Parser)]
struct BenchSimArgs {
    /// Seeds per default scenario (each also runs two bare worlds).
    #[arg(long, default_value_t = tavernsim::bench::sim::SEEDS_DEFAULT, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    seeds: u64,
    /// Worker threads; figures stay per core (timed per world on its thread).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    jobs: u64,
    /// Output format (json: one object).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Parser)]
struct BenchProxyArgs {
    /// Requests per throughput phase (direct, then through the proxy).
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
    /// Keep-alive connections sending at once in the throughput phases.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Requests per latency phase (one connection, one request at a time).
    #[arg(long, default_value_t = 5_000)]
    latency_requests: u64,
    /// Time bound of each phase, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    phase_ms_max: u64,
    /// Requests parked in a never-answering upstream for the memory figure
    /// (0 skips it; at most 3000).
    #[arg(long, default_value_t = 1_000)]
    parked: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

const SERVE_AFTER_HELP: &str = "Examples:\n  \
tavernsim serve --demo                      # mock upstream, user demo/demo, token demo-token; prints curl commands\n  \
tavernsim serve --config tavernsim.toml     # see README.md for the config file's keys\n  \
tavernsim serve --config tavernsim.toml --listen 0.0.0.0:8000 --upstream http://127.0.0.1:9000/v1";

#[derive(Parser)]
struct ServeArgs {
    /// The TOML config file: listen, users_file, session_secret, [limits],
    /// [proxy], [proxy.retry], [proxy.login] (see README.md).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "demo",
        conflicts_with = "demo"
    )]
    config: Option<PathBuf>,
    /// Demo mode: start the mock upstream (some 429s, so retries show) on a
    /// loopback port and a demo user demo/demo with bearer token demo-token
    /// (in memory only), and print curl commands to try it.
    #[arg(long)]
    demo: bool,
    /// Listen on ADDR instead of the config's `listen` (default 127.0.0.1:8000).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Use URL as the upstream API root instead of the config's
    /// proxy.upstream_url (in demo mode: instead of the embedded mock), e.g.
    /// http://127.0.0.1:9000/v1 where `tavernsim probe` or
    /// `tavernsim mock-upstream` listens.
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// For testing only: serve a defective SillyTavern variant
    /// (sillytavern-1.12.6, sillytavern-1.12.7) instead of the fixed proxy.
    #[arg(long, default_value = "fixed", value_parser = parse_variant)]
    variant: Variant,
}

const PROBE_AFTER_HELP: &str = "Examples:\n  \
tavernsim serve --demo --variant sillytavern-1.12.7 --upstream http://127.0.0.1:9000/v1   # in one terminal\n  \
tavernsim probe --target http://127.0.0.1:8000 --dialect openai --bearer demo-token       # in another\n\
Point the target's upstream (SillyTavern: the custom source's URL, which the probe sends itself;\n\
LiteLLM: api_base) at --upstream-listen. A seed fixes the schedule, not the timing.";

#[derive(Parser)]
struct ProbeArgs {
    /// The proxy to probe, e.g. http://127.0.0.1:8000.
    #[arg(long, value_name = "URL")]
    target: String,
    /// How to talk to it: openai (bearer token, /v1/chat/completions) or
    /// sillytavern (CSRF token, login, cookie session, its generate route).
    #[arg(long, value_enum)]
    dialect: DialectArg,
    /// A bearer token a client of the target uses; repeatable (tabs take
    /// them in turn).
    #[arg(long = "bearer", value_name = "TOKEN")]
    bearers: Vec<String>,
    /// A user to sign in as (sillytavern); repeatable. Without any, tabs
    /// do not log in (a single-user SillyTavern).
    #[arg(long = "user", value_name = "HANDLE[:PASSWORD]")]
    users: Vec<String>,
    /// Where the mock upstream listens; the target must forward there.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9000")]
    upstream_listen: std::net::SocketAddr,
    /// The scenario whose browser behaviour and mock script to use.
    #[arg(long, value_name = "NAME|FILE", default_value = "refresh-during-retry")]
    scenario: String,
    /// Generations to send at the most (1..=10000).
    #[arg(long, default_value_t = 60)]
    requests: u64,
    /// Stop starting generations after this long (e.g. 60s, 2m; at most 1h).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration_arg)]
    time: std::time::Duration,
    /// Seed of the schedule.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tabs at once (1..=64).
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// The target's process id: a vanished process counts as a crash.
    #[arg(long, value_name = "PID")]
    target_pid: Option<u32>,
    /// An upstream attempt more than this after its client left is
    /// attempt-after-cancel.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration_arg)]
    grace: std::time::Duration,
    /// After the last tab, watch the mock this long for attempts nobody
    /// waits for (leak) and for the target going down.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration_arg)]
    settle: std::time::Duration,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Write report.json and trace.jsonl under DIR.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DialectArg {
    Openai,
    Sillytavern,
}

#[derive(Parser)]
struct MockUpstreamArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9000")]
    listen: std::net::SocketAddr,
    /// The scenario whose upstream script to answer with.
    #[arg(long, value_name = "NAME|FILE", default_value = "refresh-during-retry")]
    scenario: String,
    /// Seed of the script's draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    tavernsim::probe::parse_duration(s)
}

#[derive(Parser)]
struct ClassifyArgs {
    /// The answer's HTTP status.
    #[arg(long, required_unless_present = "cases", value_parser = clap::value_parser!(u16).range(100..=999))]
    status: Option<u16>,
    /// A response header, "name: value"; repeatable.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// The response body as text.
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Read the response body from FILE.
    #[arg(long, value_name = "FILE")]
    body_file: Option<PathBuf>,
    /// A JSON array of cases in the provider-429 fixtures format; prints one
    /// decision per case, in order, one per line.
    #[arg(long, value_name = "FILE.json", conflicts_with_all = ["status", "headers", "body", "body_file"])]
    cases: Option<PathBuf>,
    /// A hint longer than this (ms) means give up now.
    #[arg(long, default_value_t = 60_000)]
    wait_ms_max: u64,
}

const FUZZ_AFTER_HELP: &str = "Embedded scenarios: refresh-during-retry, streaming-refresh, burst-429, one-user-floods.\n\
Aimed scenarios (by name): logout-during-retry, refresh-during-attempt, network-faults,\n\
slow-upstream, budget-storm, proxy-restart, disable-during-retry, two-tabs-one-session,\n\
stream-reset.\n\
\n\
Each violation's schedule is shrunk to the fewest actions that still break the same\n\
invariant and saved under --out with its trace; the printed command replays it:\n\
  tavernsim replay --schedule tavernsim-out/<scenario>-seed<N>-<invariant>.schedule.json\n\
\n\
A campaign over a CI matrix: run `fuzz --shard i/n --format json > shard-i.json` on\n\
each machine, then `tavernsim merge shard-*.json`.";

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Parser)]
struct FuzzArgs {
    /// Seeds to run per scenario (default 200; unbounded with --time).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    seeds: Option<u64>,
    /// Run for this long (90s, 2m, 1h) instead of a number of seeds; with
    /// --seeds too, whichever ends first.
    #[arg(long, value_name = "DURATION", value_parser = tavernsim::probe::parse_duration)]
    time: Option<std::time::Duration>,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    seed_start: u64,
    /// The proxy under test: fixed, sillytavern-1.12.6, sillytavern-1.12.7, or a
    /// mutant (`tavernsim mutants --list`).
    #[arg(long, default_value = "fixed", value_parser = parse_variant)]
    variant: Variant,
    /// An embedded scenario's name (listed below) or a path to a scenario TOML file;
    /// repeat for several. Default: every embedded scenario.
    #[arg(long = "scenario", value_name = "NAME|FILE")]
    scenarios: Vec<String>,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    jobs: Option<u64>,
    /// Run every seed and report every distinct violation (by invariant and
    /// scenario, with how many worlds showed it) instead of stopping at the first.
    #[arg(long)]
    keep_going: bool,
    /// Run only shard I of N (`--shard 2/8`): seeds seed-start+I, +I+N, +I+2N, ...
    /// (--seeds counts this shard's seeds). Combine the shards' JSON reports
    /// with `tavernsim merge`.
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    shard: Option<Shard>,
    /// Run every world twice and report a `nondeterminism` violation, with the
    /// first event that differs, when the two traces do not match.
    #[arg(long)]
    check_determinism: bool,
    /// Directory for the artifacts: per violation its shrunk schedule (JSON) and
    /// trace (JSON lines), and report.json. Created when needed.
    #[arg(long, value_name = "DIR", default_value = "tavernsim-out")]
    out: PathBuf,
    /// Save each violation's schedule as the seed gave it, without shrinking.
    #[arg(long)]
    no_shrink: bool,
    /// Worlds run at most while shrinking one violation.
    #[arg(long, value_name = "N", default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    shrink_runs: u32,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

fn parse_shard(s: &str) -> Result<Shard, String> {
    s.parse()
}

#[derive(Parser)]
#[command(after_help = REPLAY_AFTER_HELP)]
struct ReplayArgs {
    /// A schedule saved by `fuzz` (under its --out directory): runs exactly that
    /// schedule, with the seed, scenario and variant recorded in it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["seed", "scenario"])]
    schedule: Option<PathBuf>,
    /// The seed to replay (with --scenario).
    #[arg(long, required_unless_present = "schedule")]
    seed: Option<u64>,
    /// The scenario name or file the seed ran with.
    #[arg(long, value_name = "NAME|FILE", required_unless_present = "schedule")]
    scenario: Option<String>,
    /// The proxy variant to run against (default: fixed, or the one a
    /// --schedule file names; give `fixed` to check a fix against a saved schedule).
    #[arg(long, value_parser = parse_variant)]
    variant: Option<Variant>,
    /// Write the world's events to FILE as JSON lines.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Fail (exit 1) unless the trace hash is exactly this.
    #[arg(long, value_name = "HASH")]
    expect_hash: Option<String>,
}

const REPLAY_AFTER_HELP: &str = "Exit status: 0 when the world ran clean, 1 when an invariant broke (or the\n\
trace hash differs from --expect-hash), 2 for bad usage or an unreadable file.";

#[derive(Parser)]
struct MergeArgs {
    /// JSON reports of `fuzz --shard I/N --format json`, one per shard.
    #[arg(required = true, value_name = "REPORT")]
    reports: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
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
        Command::Merge(args) => merge(args),
        Command::Classify(args) => classify(args),
        Command::Probe(args) => probe(args),
        Command::MockUpstream(args) => mock_upstream(args),
        Command::Serve(args) => serve(args),
        Command::HashPassword => hash_password(),
        Command::Bench(BenchCommand::Proxy(args)) => bench_proxy(args),
        Command::Bench(BenchCommand::Sim(args)) => bench_sim(args),
        Command::Mutants(args) => mutants(args),
    }
}

fn mutants(args: MutantsArgs) -> anyhow::Result<ExitCode> {
    use tavernsim::proxy::Mutant;
    use tavernsim::sim::mutants::{Budget, HEADER, plan, row_text, run_table, summary_text};
    if args.list {
        for m in Mutant::ALL {
            let race = m.race().map_or("-".into(), |r| format!("race {r}"));
            outln!(
                "{:<33} {:<7} {:<21} {}",
                m.name(),
                race,
                m.target(),
                plan(m).scenario
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let chosen: Vec<Mutant> = if args.mutants.is_empty() {
        Mutant::ALL.to_vec()
    } else {
        let chosen: Option<Vec<Mutant>> = args.mutants.iter().map(|v| v.mutant()).collect();
        chosen.context("--mutant takes a mutant's name (see --list)")?
    };
    if args.time.is_some_and(|t| !(t > 0.0 && t.is_finite())) {
        anyhow::bail!("--time takes a positive number of seconds");
    }
    let budget = Budget {
        seeds: args.seeds,
        time: args.time.map(std::time::Duration::from_secs_f64),
        jobs: args.jobs.map(|j| j as usize).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
    };
    let text = matches!(args.format, Format::Text);
    if text {
        outln!("{HEADER}");
    }
    let table = run_table(&chosen, &budget, !args.no_measure, &|k| {
        if text {
            outln!("{}", row_text(k));
        }
    });
    if text {
        outln!("{}", summary_text(&table));
    } else {
        outln!("{}", serde_json::to_string_pretty(&table)?);
    }
    Ok(if table.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn bench_proxy(args: BenchProxyArgs) -> anyhow::Result<ExitCode> {
    use tavernsim::bench::{BenchSpec, render_text, run};
    let spec = BenchSpec {
        requests: args.requests,
        concurrency: args.concurrency,
        latency_requests: args.latency_requests,
        phase_ms_max: args.phase_ms_max,
        parked: args.parked,
    };
    spec.validate().map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = rt.block_on(run(spec))?;
    match args.format {
        Format::Text => outln!("{}", render_text(&report)),
        Format::Json => outln!("{}", serde_json::to_string(&report)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_sim(args: BenchSimArgs) -> anyhow::Result<ExitCode> {
    use tavernsim::bench::sim::{SimBenchSpec, render_text, run};
    let report = run(&SimBenchSpec {
        seeds: args.seeds,
        jobs: args.jobs as usize,
    })?;
    match args.format {
        Format::Text => outln!("{}", render_text(&report)),
        Format::Json => outln!("{}", serde_json::to_string(&report)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn hash_password() -> anyhow::Result<ExitCode> {
    use rand::{Rng, SeedableRng};
    use std::io::Read as _;
    use tavernsim::proxy::users::{HashCost, PASSWORD_BYTES_MAX};
    let mut line = String::new();
    std::io::Read::take(std::io::stdin().lock(), PASSWORD_BYTES_MAX as u64 + 2)
        .read_to_string(&mut line)
        .context("cannot read the password from stdin")?;
    let password = line.lines().next().unwrap_or("");
    if password.is_empty() {
        anyhow::bail!(
            "no password on stdin; run e.g. `printf '%s\\n' 'my password' | tavernsim hash-password`"
        );
    }
    let salt: [u8; 16] = rand_chacha::ChaCha20Rng::from_os_rng().random();
    let phc = tavernsim::proxy::users::hash_password(password, &salt, HashCost::Standard)?;
    outln!("{phc}");
    Ok(ExitCode::SUCCESS)
}

/// Logs for `serve` only: the simulation installs its own subscriber per
/// world and must never see a global one's output.
/// Logs to stderr; `RUST_LOG` wins over `default` (e.g. "info,tavernsim::ev=warn").
fn init_logging(default: &'static str) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v).unwrap_or_else(|e| {
            eprintln!("tavernsim: RUST_LOG={v:?} is not a valid filter ({e}); using {default:?}");
            EnvFilter::new(default)
        }),
        _ => EnvFilter::new(default),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    use tavernsim::proxy::ExitHook;
    use tavernsim::serve::{ServeConfig, demo_commands, start_demo, start_from_config};
    let cfg = match &args.config {
        Some(path) => {
            let mut cfg = ServeConfig::load(path)?;
            if let Some(listen) = args.listen {
                cfg.listen = listen;
            }
            if let Some(url) = &args.upstream {
                cfg.proxy.upstream_url = url.clone();
            }
            cfg.proxy.variant = args.variant;
            Some(cfg)
        }
        None => None,
    };
    let rt = server_runtime("info,tavernsim::ev=warn")?;
    rt.block_on(async move {
        let running = match cfg {
            Some(cfg) => start_from_config(cfg, ExitHook::process()).await?,
            None => {
                let listen = args
                    .listen
                    .unwrap_or_else(|| ServeConfig::default().listen);
                start_demo(listen, args.variant, args.upstream.clone(), ExitHook::process()).await?
            }
        };
        let addr = running.addr;
        let upstream = running
            .upstream_url
            .clone()
            .unwrap_or_else(|| running.state.cfg.upstream_url.clone());
        tracing::info!(%addr, %upstream, variant = %args.variant, "serving");
        outln!("tavernsim serve: proxy on http://{addr}, upstream {upstream}, variant {}", args.variant);
        if args.demo {
            let upstream_note = match &args.upstream {
                Some(url) => format!("demo mode: forwarding to {url} (no embedded mock);"),
                None => "demo mode: the mock upstream answers about 3 attempts in 10 with 429, so the proxy retries;".into(),
            };
            outln!(
                "{upstream_note}\n\
                 user demo, password demo, bearer token demo-token (demo only, users in memory). Try:\n"
            );
            outln!("{}\n", demo_commands(addr));
        }
        outln!("Ctrl-C stops the server.");
        tokio::select! {
            r = running.wait() => r.map(|()| ExitCode::SUCCESS),
            _ = tokio::signal::ctrl_c() => Ok(ExitCode::SUCCESS),
        }
    })
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
    let seeds = match (args.seeds, args.time) {
        (Some(n), _) => n,
        (None, Some(_)) => 10_000_000,
        (None, None) => 200,
    };
    let text = matches!(args.format, Format::Text);
    let spec = CampaignSpec {
        scenarios,
        variant: args.variant,
        seed_start: args.seed_start,
        seeds,
        jobs,
        stop_on_first: !args.keep_going,
        progress: text,
        shard: args.shard.unwrap_or_default(),
        check_determinism: args.check_determinism,
    };
    let deadline = args.time.map(|t| std::time::Instant::now() + t);
    let mut report = campaign::run_until(&spec, &|_| true, deadline);
    let opts = ArtifactOptions {
        out: args.out.clone(),
        shrink: !args.no_shrink,
        budget: ShrinkBudget {
            runs_max: args.shrink_runs,
            ..ShrinkBudget::default()
        },
    };
    let tty = text && std::io::IsTerminal::is_terminal(&std::io::stderr());
    save_findings(&spec, &mut report, &opts, &mut |line| {
        if line.starts_with("warning:") {
            eprintln!("{}tavernsim: {line}", if tty { "\r\x1b[2K" } else { "" });
        } else if tty {
            eprint!("\r\x1b[2K{line}");
        }
    })
    .with_context(|| {
        format!(
            "could not save the violations' schedules under {}; give --out DIR with a writable directory",
            opts.out.display()
        )
    })?;
    if tty && !report.violations.is_empty() {
        eprint!("\r\x1b[2K");
    }
    if !report.violations.is_empty() || args.out.exists() {
        std::fs::create_dir_all(&args.out)?;
        std::fs::write(
            args.out.join("report.json"),
            serde_json::to_string_pretty(&report)?,
        )
        .with_context(|| format!("could not write {}/report.json", args.out.display()))?;
    }
    match args.format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => print_report(&report, spec.stop_on_first),
    }
    Ok(exit_code(&report))
}

/// fuzz's and merge's exit status: 3 a harness error, 1 a violation, else 0.
fn exit_code(report: &Report) -> ExitCode {
    if !report.harness_errors.is_empty() {
        ExitCode::from(3)
    } else if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `command` ("tavernsim ...") as this binary was invoked (for example
/// `./target/release/tavernsim ...`), so it can be pasted as is.
fn as_invoked(command: &str) -> String {
    let argv0 = std::env::args().next().unwrap_or_default();
    match command.strip_prefix("tavernsim ") {
        Some(rest) if argv0.contains('/') => format!("{argv0} {rest}"),
        _ => command.to_string(),
    }
}

fn print_report(r: &Report, stopped_on_first: bool) {
    outln!(
        "variant {}: {} seeds of {}{} in {:.1}s ({:.1} seeds/s, {:.0} simulated seconds, {:.0}x real time)",
        r.variant,
        r.seeds_run,
        r.scenarios.join(", "),
        if r.shard.count > 1 {
            format!(" (shard {})", r.shard)
        } else {
            String::new()
        },
        r.wall_seconds,
        r.seeds_per_second,
        r.sim_seconds,
        if r.wall_seconds > 0.0 {
            r.sim_seconds / r.wall_seconds
        } else {
            0.0
        },
    );
    let reached: Vec<String> = r
        .coverage
        .iter()
        .map(|(phase, n)| format!("{phase} {n}"))
        .collect();
    outln!("refreshes by phase of the request: {}", reached.join(", "));
    for e in &r.harness_errors {
        outln!("HARNESS ERROR {e}");
    }
    if r.violations.is_empty() {
        outln!("clean: no invariant broke");
        return;
    }
    outln!("{} distinct violations:", r.violations.len());
    for v in &r.violations {
        outln!(
            "\nseed {} scenario {} variant {}: {}{}",
            v.seed,
            v.scenario,
            r.variant,
            v.invariant,
            if v.worlds > 1 {
                format!(" (in {} worlds)", v.worlds)
            } else {
                String::new()
            }
        );
        outln!("  {}", v.message);
        match v.actions {
            Some((before, after)) if after < before => {
                outln!("  schedule: {after} actions (shrunk from {before})")
            }
            Some((_, after)) => outln!("  schedule: {after} actions"),
            None => {}
        }
        outln!("  replay: {}", as_invoked(&v.replay));
    }
    if stopped_on_first {
        outln!("\n(stopped at the first violating seed; --keep-going runs every seed)");
    }
}

fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let (seed, origin, scenario, variant, schedule, saved) = match &args.schedule {
        Some(path) => {
            let saved = SavedSchedule::load(path).map_err(|e| {
                anyhow::anyhow!("{e}\n(a schedule file is what `tavernsim fuzz` saves under its --out directory)")
            })?;
            let recorded: anyhow::Result<Variant> = saved.variant.parse().map_err(|e: String| {
                anyhow::anyhow!("{}: variant {e}; give --variant", path.display())
            });
            let variant = match (args.variant, recorded) {
                (Some(v), _) => v,
                (None, Ok(v)) => v,
                (None, Err(e)) => return Err(e),
            };
            (
                saved.seed,
                saved.scenario_origin.clone(),
                saved.scenario(),
                variant,
                Some(Arc::new(saved.schedule.clone())),
                Some(saved),
            )
        }
        None => {
            let (Some(seed), Some(name)) = (args.seed, args.scenario.clone()) else {
                anyhow::bail!("give --schedule FILE, or --seed N with --scenario NAME|FILE");
            };
            let scenario = Scenario::load(&name).map_err(anyhow::Error::msg)?;
            let variant = args.variant.unwrap_or(Variant::Fixed);
            (seed, name, Arc::new(scenario), variant, None, None)
        }
    };
    let mut world = WorldSpec::new(seed, scenario, variant);
    world.schedule = schedule;
    let run = run_world(&world);
    if let Some(path) = &args.trace {
        std::fs::write(path, to_json_lines(&run.events))
            .with_context(|| format!("could not write the trace to {}", path.display()))?;
    }
    outln!(
        "seed {seed} scenario {origin} variant {variant}{}: {} events, {:.3} simulated seconds, ended {:?}",
        match &saved {
            Some(s) => format!(" (saved schedule, {} actions)", s.schedule.actions()),
            None => String::new(),
        },
        run.events.len(),
        run.sim_ms as f64 / 1000.0,
        run.end
    );
    if let Some(e) = &run.error {
        outln!("error: {e}");
    }
    if run.violations.is_empty() {
        outln!("verdict: clean");
    }
    for v in &run.violations {
        outln!(
            "verdict: {} at {:.3}s ({}x): {}",
            v.invariant,
            v.t_us as f64 / 1e6,
            v.count,
            v.message
        );
    }
    outln!("trace hash: {}", run.trace_hash);
    if let Some(saved) = &saved
        && !saved.invariant.is_empty()
        && saved.variant == variant.to_string()
    {
        if run
            .violations
            .iter()
            .any(|v| v.invariant == saved.invariant)
        {
            outln!("reproduced: {} broke again", saved.invariant);
        } else {
            outln!(
                "NOT reproduced: the schedule was saved when it broke {}; this build does not break it",
                saved.invariant
            );
        }
    }
    if let Some(expected) = &args.expect_hash {
        if *expected != run.trace_hash {
            outln!(
                "trace hash differs from the expected {expected}: this build does not replay that run exactly"
            );
            return Ok(ExitCode::from(1));
        }
        outln!("trace hash matches");
    }
    Ok(if run.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn merge(args: MergeArgs) -> anyhow::Result<ExitCode> {
    let mut reports = Vec::new();
    for path in &args.reports {
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        anyhow::ensure!(
            meta.len() <= 256 * 1024 * 1024,
            "{}: larger than 256 MiB; is it a fuzz report?",
            path.display()
        );
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let report: Report = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a fuzz report (write one with `tavernsim fuzz --shard I/N --format json > FILE`)",
                path.display()
            )
        })?;
        reports.push(report);
    }
    let missing = campaign::missing_shards(&reports);
    let merged = campaign::merge(reports).map_err(anyhow::Error::msg)?;
    match args.format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&merged)?),
        Format::Text => print_report(&merged, merged.violations.len() <= 1),
    }
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|i| i.to_string()).collect();
        eprintln!(
            "tavernsim: warning: shards {} of {} are missing: the merged report covers part of the seed space",
            list.join(", "),
            merged.shard.count
        );
    }
    Ok(exit_code(&merged))
}

/// Largest body or cases file `classify` reads.
const CLASSIFY_FILE_BYTES_MAX: u64 = 16 * 1024 * 1024;

fn read_bounded(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if len > CLASSIFY_FILE_BYTES_MAX {
        anyhow::bail!(
            "{} is larger than {CLASSIFY_FILE_BYTES_MAX} bytes",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// "Now" for a recorded answer: its own Date header when it has one (the
/// moment it was sent), else the current time.
fn answer_now(headers: &http::HeaderMap) -> std::time::SystemTime {
    headers
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok())
        .unwrap_or_else(std::time::SystemTime::now)
}

fn classify(args: ClassifyArgs) -> anyhow::Result<ExitCode> {
    use tavernsim::proxy::classify::{ClassifyLimits, classify, classify_case};
    let limits = ClassifyLimits {
        wait_ms_max: args.wait_ms_max,
    };
    if let Some(path) = &args.cases {
        let cases: Vec<serde_json::Value> = serde_json::from_slice(&read_bounded(path)?)
            .with_context(|| format!("{} is not a JSON array of cases", path.display()))?;
        for (i, case) in cases.iter().enumerate() {
            let mut headers = http::HeaderMap::new();
            if let Some(date) = case
                .pointer("/headers/date")
                .or(case.pointer("/headers/Date"))
                .and_then(|v| v.as_str())
                && let Ok(v) = http::HeaderValue::from_str(date)
            {
                headers.insert(http::header::DATE, v);
            }
            let c = classify_case(case, answer_now(&headers), &limits)
                .map_err(|e| anyhow::anyhow!("case {i} of {}: {e}", path.display()))?;
            outln!("{}", serde_json::to_string(&c)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let status = args
        .status
        .context("--status is required (or give --cases FILE)")?;
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .with_context(|| format!("--header '{h}' must look like 'name: value'"))?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("--header '{h}': '{}' is not a header name", name.trim()))?;
        let value = http::HeaderValue::from_str(value.trim())
            .with_context(|| format!("--header '{h}': the value is not a valid header value"))?;
        headers.append(name, value);
    }
    let body = match (&args.body, &args.body_file) {
        (Some(b), _) => b.as_bytes().to_vec(),
        (None, Some(path)) => read_bounded(path)?,
        (None, None) => Vec::new(),
    };
    let c = classify(status, &headers, &body, answer_now(&headers), &limits);
    outln!("{}", serde_json::to_string(&c)?);
    Ok(ExitCode::SUCCESS)
}

fn probe(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    use tavernsim::probe::{Credential, ProbeSpec, run, write_artifacts};
    use tavernsim::proxy::Dialect;
    let scenario = Scenario::load(&args.scenario).map_err(anyhow::Error::msg)?;
    let mut credentials: Vec<Credential> = args
        .bearers
        .iter()
        .map(|b| Credential::Bearer(b.clone()))
        .collect();
    for u in &args.users {
        let (handle, password) = u.split_once(':').unwrap_or((u.as_str(), ""));
        credentials.push(Credential::User {
            handle: handle.to_string(),
            password: password.to_string(),
        });
    }
    let spec = ProbeSpec {
        target: args.target.clone(),
        dialect: match args.dialect {
            DialectArg::Openai => Dialect::OpenAi,
            DialectArg::Sillytavern => Dialect::SillyTavern,
        },
        credentials,
        upstream_listen: args.upstream_listen,
        scenario: Arc::new(scenario),
        scenario_origin: args.scenario.clone(),
        requests: args.requests,
        time: args.time,
        seed: args.seed,
        concurrency: args.concurrency,
        target_pid: args.target_pid,
        grace: args.grace,
        settle: args.settle,
    };
    if matches!(args.format, Format::Text) {
        eprintln!(
            "probing {} ({} tabs, at most {} generations in {:?}, mock upstream on {}) ...",
            args.target, args.concurrency, args.requests, args.time, args.upstream_listen
        );
    }
    let report = run(&spec)?;
    if let Some(dir) = &args.out {
        write_artifacts(&report, dir)?;
    }
    match args.format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => {
            outln!(
                "target {} ({}): {} generations, {} refreshes, {} upstream attempts in {:.1}s (real time; {})",
                report.target,
                report.dialect,
                report.requests_sent,
                report.refreshes,
                report.upstream_attempts,
                report.wall_seconds,
                report.note
            );
            if report.violations.is_empty() {
                outln!("clean: nothing visible from outside broke");
            }
            for v in &report.violations {
                outln!("\n{} at {:.3}s\n  {}", v.invariant, v.at_seconds, v.message);
            }
            outln!(
                "\nrerun: the same schedule is --seed {} --scenario {}",
                report.schedule.seed,
                report.schedule.scenario
            );
        }
    }
    Ok(if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Logging and a multi-threaded runtime, for the commands that serve.
fn server_runtime(log_default: &'static str) -> anyhow::Result<tokio::runtime::Runtime> {
    init_logging(log_default);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn mock_upstream(args: MockUpstreamArgs) -> anyhow::Result<ExitCode> {
    use tavernsim::net::{Listener, ServeLimits, Transport, serve};
    use tavernsim::upstream::{self, MockUpstream};
    let scenario = Scenario::load(&args.scenario).map_err(anyhow::Error::msg)?;
    // Every attempt is an info event: log them by default.
    let rt = server_runtime("info")?;
    rt.block_on(async move {
        let listener = Listener::bind(Transport::Tokio, args.listen)
            .await
            .with_context(|| format!("cannot listen on {}; pick another --listen", args.listen))?;
        let addr = listener.local_addr()?;
        outln!("tavernsim mock-upstream: http://{addr}/v1 (scenario {}, seed {}); every attempt is logged", args.scenario, args.seed);
        let app = upstream::app(MockUpstream::new(scenario.upstream.clone(), args.seed));
        tokio::select! {
            r = serve(listener, app, ServeLimits::default()) => r.map(|()| ExitCode::SUCCESS).map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => Ok(ExitCode::SUCCESS),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lists_every_embedded_scenario() {
        for (name, _) in EMBEDDED {
            assert!(
                FUZZ_AFTER_HELP.contains(name),
                "fuzz --help does not list {name}"
            );
        }
        Cli::command_for_test();
    }

    impl Cli {
        fn command_for_test() {
            use clap::CommandFactory;
            Cli::command().debug_assert();
        }
    }
}
