//! The `pullkeeper` command line.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use pullkeeper::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Keeps image pull secrets fresh in every namespace that needs them.
#[derive(Parser, Debug)]
#[command(name = "pullkeeper", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator (the default).
    Controller(Box<ControllerArgs>),
    /// Check that images would pull: resolve their manifests with a credential.
    Check(CheckArgs),
    /// Print the MutatingAdmissionPolicies that keep new Pods race-free (the Helm chart
    /// ships the same, from `charts/pullkeeper/files/`).
    AdmissionPolicies,
    /// Print the CRDs as YAML, or write one file per CRD into a directory.
    Crds {
        /// Write `<crd name>.yaml` files into this directory instead of printing.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// Images, e.g. `ghcr.io/acme/api:v2`, `nginx`, `registry:5000/app@sha256:...`.
    #[arg(required_unless_present = "cluster", conflicts_with = "cluster")]
    images: Vec<String>,
    /// Check the images every workload of the cluster uses, with the pull Secrets the
    /// kubelet would use, for the platforms of the nodes (current kubeconfig).
    #[arg(long, conflicts_with_all = ["docker_config", "secret", "platforms"])]
    cluster: bool,
    /// With --cluster: this namespace (default: the kubeconfig's).
    #[arg(short = 'n', long, requires = "cluster")]
    namespace: Option<String>,
    /// With --cluster: every namespace.
    #[arg(short = 'A', long, requires = "cluster", conflicts_with = "namespace")]
    all_namespaces: bool,
    /// A docker config.json (credential helpers and stores are run as docker does).
    #[arg(long, conflicts_with = "secret")]
    docker_config: Option<PathBuf>,
    /// A Kubernetes pull Secret `namespace/name` (read with the current kubeconfig).
    #[arg(long)]
    secret: Option<String>,
    /// A platform that must be present, e.g. `linux/arm64` (repeatable).
    #[arg(long = "platform")]
    platforms: Vec<String>,
    /// PEM file of extra CA certificates.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Do not verify TLS certificates.
    #[arg(long)]
    insecure_skip_verify: bool,
    /// Never contact registries in these ranges, e.g. `10.0.0.0/8` (repeatable or
    /// comma-separated), on top of link-local and cloud metadata addresses.
    #[arg(long = "deny-cidr")]
    deny_cidrs: Vec<pullkeeper::registry::CidrList>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Output {
    #[value(alias = "table")]
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
struct ControllerArgs {
    /// Address for /metrics, and for /healthz and /readyz too unless --health-addr
    /// names another one.
    #[arg(long, env = "PULLKEEPER_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Address for /healthz and /readyz (the kubelet's probes), e.g. so that
    /// --metrics-addr can be 127.0.0.1:8080. Default: the --metrics-addr listener.
    #[arg(long, env = "PULLKEEPER_HEALTH_ADDR")]
    health_addr: Option<SocketAddr>,
    /// Require a bearer token on /metrics that the apiserver authenticates (TokenReview)
    /// and allows to get the non-resource URL /metrics (SubjectAccessReview).
    #[arg(long, env = "PULLKEEPER_METRICS_AUTH", default_value_t = false)]
    metrics_auth: bool,
    /// Only read ClusterRegistryCredential source Secrets in this namespace; a credential
    /// naming another one is refused as InvalidSpec. Empty: any namespace.
    #[arg(long, env = "PULLKEEPER_SOURCE_SECRET_NAMESPACE")]
    source_secret_namespace: Option<String>,
    /// Log format.
    #[arg(long, env = "PULLKEEPER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Parallel reconciles per kind.
    #[arg(long, env = "PULLKEEPER_CONCURRENCY", default_value_t = 8)]
    concurrency: u16,
    /// Parallel writes (Secrets, ServiceAccounts) within one reconcile.
    #[arg(long, env = "PULLKEEPER_WRITE_CONCURRENCY", default_value_t = 32)]
    write_concurrency: usize,
    /// Only reconcile credentials whose labels match this selector (e.g. `shard=a`).
    #[arg(long, env = "PULLKEEPER_CREDENTIAL_SELECTOR")]
    credential_selector: Option<String>,
    /// Elect a leader among replicas with a Lease, so only one reconciles.
    #[arg(long, env = "PULLKEEPER_LEADER_ELECT", default_value_t = false)]
    leader_elect: bool,
    /// Namespace of the leader Lease (default: this pod's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(long, env = "PULLKEEPER_LEADER_ELECTION_ID", default_value = "pullkeeper")]
    leader_election_id: String,
    /// Seconds a Lease stays valid without renewal.
    #[arg(long, env = "PULLKEEPER_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Seconds between renewals (and between attempts of standbys).
    #[arg(long, env = "PULLKEEPER_LEASE_RENEW_SECONDS", default_value_t = 5)]
    lease_renew_seconds: u64,
    /// Keep new Pods race-free with a MutatingAdmissionPolicy (Kubernetes 1.36+): a Pod
    /// created before its ServiceAccount holds the pull secret still gets it.
    #[arg(long, env = "PULLKEEPER_POD_ADMISSION_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
    pod_admission_policy: bool,
    /// Serve a mutating admission webhook that does what the policy does, for apiservers
    /// that do not serve MutatingAdmissionPolicy v1 (Kubernetes 1.30-1.35). Where both are
    /// possible the policy wins, unless --pod-admission-policy=false. Every replica serves
    /// it; the MutatingWebhookConfiguration fails open.
    #[arg(long, env = "PULLKEEPER_POD_ADMISSION_WEBHOOK", default_value_t = false)]
    pod_admission_webhook: bool,
    /// Address the webhook listens on (HTTPS).
    #[arg(long, env = "PULLKEEPER_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    webhook_addr: SocketAddr,
    /// Name of the MutatingWebhookConfiguration (installed by the chart).
    #[arg(long, env = "PULLKEEPER_WEBHOOK_CONFIGURATION", default_value = "pullkeeper")]
    webhook_configuration: String,
    /// Service (in the operator's namespace) the configuration points at; the serving
    /// certificate is made for its DNS names.
    #[arg(long, env = "PULLKEEPER_WEBHOOK_SERVICE", default_value = "pullkeeper-webhook")]
    webhook_service: String,
    /// Out-of-cluster and development use: the apiserver reaches the webhook at this URL
    /// (e.g. https://127.0.0.1:9443) instead of through a Service. The certificate is made
    /// for its host, and the configuration is created pointing at it if it does not exist.
    #[arg(long, env = "PULLKEEPER_WEBHOOK_URL")]
    webhook_url: Option<url::Url>,
    /// Secret in the operator's namespace holding the serving certificate the operator
    /// manages (a self-signed CA, renewed before expiry, patched into the configuration's
    /// caBundle).
    #[arg(
        long,
        env = "PULLKEEPER_WEBHOOK_CERT_SECRET",
        default_value = "pullkeeper-webhook-cert"
    )]
    webhook_cert_secret: String,
    /// Serve the certificate mounted in this directory (tls.crt, tls.key; e.g. from
    /// cert-manager, whose cainjector fills the caBundle) instead of managing one.
    #[arg(long, env = "PULLKEEPER_WEBHOOK_CERT_DIR")]
    webhook_cert_dir: Option<PathBuf>,
    /// Comma-separated namespaces whose Pods the webhook never changes (the operator's own
    /// is always added).
    #[arg(
        long,
        env = "PULLKEEPER_WEBHOOK_SKIP_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    webhook_skip_namespaces: Vec<String>,
    /// Instance name reported in Events (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Comma-separated CIDRs that `verify` never contacts (e.g. the node and service
    /// networks), on top of the link-local and cloud metadata addresses always refused.
    #[arg(long, env = "PULLKEEPER_DENY_REGISTRY_CIDRS")]
    deny_registry_cidrs: Vec<pullkeeper::registry::CidrList>,
    /// Let a namespaced RegistryCredential use pullkeeper's own cloud identity (AWS
    /// default chain/IRSA/Pod Identity, GKE metadata server, Azure workload identity).
    /// Off: such a credential is refused with reason AmbientCredentialsNotAllowed.
    #[arg(long, env = "PULLKEEPER_NAMESPACED_AMBIENT_CREDENTIALS", default_value_t = false)]
    namespaced_ambient_credentials: bool,
    /// Check the images that Pods, Deployments, StatefulSets, DaemonSets, Jobs and
    /// CronJobs in the namespaces pullkeeper's credentials target would pull, with the pull
    /// Secrets the kubelet would use: an Event on the workload and a metric when one turns
    /// unpullable (and back), a summary in each credential's status. The leader runs them.
    #[arg(long, env = "PULLKEEPER_WORKLOAD_CHECKS", default_value_t = false)]
    workload_checks: bool,
    /// How often every workload is checked again (a workload whose pod template changes is
    /// checked at once), as a Go-style duration (`10m`, `90s`).
    #[arg(long, env = "PULLKEEPER_WORKLOAD_CHECK_INTERVAL", default_value = "10m", value_parser = go_duration)]
    workload_check_interval: std::time::Duration,
    /// Google OAuth2 token endpoint for service-account keys (private endpoints, tests).
    #[arg(long, env = "PULLKEEPER_GCP_TOKEN_URL", default_value = pullkeeper::provider::gcp::DEFAULT_TOKEN_URL)]
    gcp_token_url: String,
    /// Google Security Token Service endpoint for workload identity federation.
    #[arg(long, env = "PULLKEEPER_GCP_STS_URL", default_value = pullkeeper::provider::gcp::DEFAULT_STS_URL)]
    gcp_sts_url: String,
    /// Base URL of Google's IAM Credentials API (service account impersonation).
    #[arg(
        long,
        env = "PULLKEEPER_GCP_IAM_CREDENTIALS_URL",
        default_value = pullkeeper::provider::gcp::DEFAULT_IAM_CREDENTIALS_URL
    )]
    gcp_iam_credentials_url: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    pullkeeper::install_crypto_provider();
    match cli.command {
        Some(Command::Crds { dir }) => crds(dir),
        Some(Command::AdmissionPolicies) => {
            out(&pullkeeper::controller::admission::policies_yaml()?)?;
            Ok(())
        }
        Some(Command::Check(args)) => check(args),
        Some(Command::Controller(args)) => controller(*args),
        None => controller(ControllerArgs::parse_from(["pullkeeper"])),
    }
}

#[tokio::main]
async fn check(args: CheckArgs) -> anyhow::Result<()> {
    use pullkeeper::check;
    if args.cluster {
        return check_cluster(args).await;
    }
    let logins = match (&args.docker_config, &args.secret) {
        (Some(path), _) => check::read_docker_config(path)?,
        (None, Some(ns_name)) => {
            let (ns, name) = ns_name.split_once('/').context("--secret takes namespace/name")?;
            let client = kube::Client::try_default()
                .await
                .context("reading the kubeconfig for --secret")?;
            let secret = kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client, ns)
                .get(name)
                .await
                .with_context(|| format!("reading Secret {ns_name}"))?;
            let raw = secret
                .data
                .and_then(|d| d.get(pullkeeper::provider::DOCKER_CONFIG_JSON_KEY).cloned())
                .with_context(|| format!("Secret {ns_name} has no .dockerconfigjson"))?;
            check::Logins::DockerConfig(raw.0)
        }
        (None, None) => check::Logins::Anonymous,
    };
    let client = registry_client(&args)?;
    let reports = check::check(&client, &logins, &args.images, &args.platforms).await;
    match args.output {
        Output::Text => out(&check::render_text(&reports))?,
        Output::Json => out(&format!("{}\n", serde_json::to_string_pretty(&reports)?))?,
    }
    if reports.iter().any(|r| !r.pullable) {
        std::process::exit(1);
    }
    Ok(())
}

fn registry_client(args: &CheckArgs) -> anyhow::Result<pullkeeper::registry::RegistryClient> {
    let ca_bundle = match &args.ca_file {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    Ok(pullkeeper::registry::RegistryClient::with_policy(
        &pullkeeper::registry::TlsOptions {
            ca_bundle,
            insecure_skip_verify: args.insecure_skip_verify,
        },
        pullkeeper::registry::AddressPolicy::new(args.deny_cidrs.iter().flat_map(|l| l.0.clone()).collect()),
    )?)
}

/// `check --cluster`: exit 1 when any workload image would not pull or cannot be checked.
async fn check_cluster(args: CheckArgs) -> anyhow::Result<()> {
    use pullkeeper::workload::{self, cluster::Scope};
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration found: set KUBECONFIG")?;
    let scope = match (&args.namespace, args.all_namespaces) {
        (_, true) => Scope::All,
        (Some(ns), false) => Scope::Namespace(ns.clone()),
        (None, false) => Scope::Namespace(config.default_namespace.clone()),
    };
    let kube = kube::Client::try_from(config).context("building the Kubernetes client")?;
    let report = workload::check_cluster(&kube, registry_client(&args)?, &scope).await?;
    match args.output {
        Output::Text => out(&report.table())?,
        Output::Json => out(&format!("{}\n", serde_json::to_string_pretty(&report)?))?,
    }
    if !report.findings.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

fn crds(dir: Option<PathBuf>) -> anyhow::Result<()> {
    match dir {
        None => out(&pullkeeper::crd::crds_yaml()?)?,
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for crd in pullkeeper::crd::crds() {
                let path = dir.join(pullkeeper::crd::crd_file_name(&crd));
                let yaml = format!("---\n{}", serde_yaml::to_string(&crd)?);
                std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

impl ControllerArgs {
    fn parse_from<I: IntoIterator<Item = &'static str>>(args: I) -> Self {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            args: ControllerArgs,
        }
        Only::parse_from(args).args
    }
}

#[tokio::main]
async fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration found: set KUBECONFIG or run inside a cluster")?;
    let metrics = std::sync::Arc::new(pullkeeper::metrics::Metrics::default());
    let client = pullkeeper::operator::client(config, &metrics).context("building the Kubernetes client")?;
    let mut endpoints = endpoints(&args).await?;
    if args.pod_admission_webhook {
        let settings = webhook_settings(&args)?;
        let listener = tokio::net::TcpListener::bind(args.webhook_addr)
            .await
            .with_context(|| format!("binding {}", args.webhook_addr))?;
        endpoints.webhook = Some((listener, settings));
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(pullkeeper::operator::cancel_on_signal(shutdown.clone()));
    let leader = if args.leader_elect {
        let namespace =
            own_namespace(&args).context("--leader-elect needs --leader-election-namespace (or POD_NAMESPACE)")?;
        Some(pullkeeper::leader::Config {
            namespace,
            name: args.leader_election_id,
            identity: args
                .instance
                .clone()
                .unwrap_or_else(|| format!("pullkeeper-{}-{:08x}", std::process::id(), rand_suffix())),
            duration: std::time::Duration::from_secs(args.lease_duration_seconds.max(2)),
            renew_every: std::time::Duration::from_secs(
                args.lease_renew_seconds
                    .clamp(1, args.lease_duration_seconds.max(2) / 2),
            ),
        })
    } else {
        None
    };
    let deny_registry_cidrs: Vec<pullkeeper::registry::Cidr> =
        args.deny_registry_cidrs.into_iter().flat_map(|l| l.0).collect();
    let workload_checks = args.workload_checks.then_some(args.workload_check_interval);
    let settings = pullkeeper::controller::Settings {
        credential_selector: args.credential_selector,
        leader,
        instance: args.instance,
        concurrency: args.concurrency.max(1),
        write_concurrency: args.write_concurrency.max(1),
        pod_admission: args.pod_admission_policy,
        pod_admission_webhook: args.pod_admission_webhook,
        source_secret_namespace: args.source_secret_namespace.filter(|ns| !ns.is_empty()),
        deny_registry_cidrs,
        workload_checks,
        namespaced_ambient_credentials: args.namespaced_ambient_credentials,
        endpoints: pullkeeper::provider::Endpoints {
            gcp_token_url: args.gcp_token_url,
            gcp_sts_url: args.gcp_sts_url,
            gcp_iam_credentials_url: args.gcp_iam_credentials_url,
        },
    };
    pullkeeper::operator::run_with(client, metrics, endpoints, settings, shutdown)
        .await
        .context("serving health and metrics")?;
    Ok(())
}

/// A Go-style duration flag (`10m`, `90s`, `1h30m`).
fn go_duration(value: &str) -> Result<std::time::Duration, String> {
    pullkeeper::controller::validate::duration("--workload-check-interval", value).map_err(|e| e.to_string())
}

/// The operator's namespace: POD_NAMESPACE, or the one of its in-cluster ServiceAccount.
fn own_namespace(args: &ControllerArgs) -> std::io::Result<String> {
    match &args.leader_election_namespace {
        Some(ns) => Ok(ns.clone()),
        None => std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            .map(|s| s.trim().to_owned()),
    }
}

fn webhook_settings(args: &ControllerArgs) -> anyhow::Result<pullkeeper::webhook::Settings> {
    use pullkeeper::webhook::{self, Certs, configuration::Endpoint};
    let namespace = own_namespace(args).context("--pod-admission-webhook needs POD_NAMESPACE")?;
    let endpoint = match &args.webhook_url {
        Some(url) => Endpoint::Url(url.to_string()),
        None => Endpoint::Service {
            namespace: namespace.clone(),
            name: args.webhook_service.clone(),
        },
    };
    let certs = match &args.webhook_cert_dir {
        Some(dir) => Certs::Files(dir.clone()),
        None => Certs::Managed {
            namespace: namespace.clone(),
            secret: args.webhook_cert_secret.clone(),
            hosts: webhook::hosts(&endpoint),
        },
    };
    let mut skip: Vec<String> = args
        .webhook_skip_namespaces
        .iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if !skip.contains(&namespace) {
        skip.push(namespace);
    }
    Ok(webhook::Settings {
        configuration: args.webhook_configuration.clone(),
        endpoint,
        certs,
        skip_namespaces: skip,
        credential_selector: args.credential_selector.clone(),
    })
}

/// One listener for everything, unless --health-addr names a different address.
async fn endpoints(args: &ControllerArgs) -> anyhow::Result<pullkeeper::operator::Endpoints> {
    async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))
    }
    let (health, metrics) = match args.health_addr {
        Some(h) if h != args.metrics_addr => (bind(h).await?, Some(bind(args.metrics_addr).await?)),
        _ => (bind(args.metrics_addr).await?, None),
    };
    Ok(pullkeeper::operator::Endpoints {
        health,
        metrics,
        metrics_auth: args.metrics_auth,
        webhook: None,
    })
}

/// Writes `text` to stdout; a reader that went away (`pullkeeper crds | head`) is no error.
fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
