"""One frozen settings object, built once at the entry point.

Precedence, lowest to highest: built-in defaults < ``hooocus.toml`` < ``HOOOCUS_*`` environment
variables < command-line flags. :func:`load_settings` also records where each value came from, so
``hooocus config show`` can print it. Library code never reads the environment or argv: it gets a
:class:`Settings` (or the parts it needs) passed in.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from engine.core.errors import InvalidRequest, pydantic_error_to_hooocus

ENV_PREFIX = "HOOOCUS_"
SECRET_FIELDS = frozenset({"tokens", "url_signing_key"})


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".local" / "share")
    return Path(base) / "hooocus"


#: A compute device name as the settings accept it (checked here, at the boundary; torch reads it later).
DeviceName = Annotated[str, StringConstraints(pattern=r"^(auto|cpu|cuda(:[0-9]+)?|mps(:[0-9]+)?)$")]


class Settings(BaseModel):
    """Every knob of a Hooocus process. Paths left ``None`` derive from ``data_dir``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- files --------------------------------------------------------------------------------
    data_dir: Path = Field(default_factory=default_data_dir)
    #: Extra folders to search, e.g. an existing Fooocus/A1111/ComfyUI install's models folders.
    checkpoint_dirs: tuple[Path, ...] = ()
    lora_dirs: tuple[Path, ...] = ()
    vae_dirs: tuple[Path, ...] = ()
    embedding_dirs: tuple[Path, ...] = ()
    style_dirs: tuple[Path, ...] = ()
    wildcard_dirs: tuple[Path, ...] = ()
    preset_dirs: tuple[Path, ...] = ()
    #: Folder with CLIP tokenizer files (vocab.json, merges.txt) for single-file checkpoints.
    clip_tokenizer_dir: Path | None = None
    #: Fooocus V2 expansion folder (GPT-2 weights as safetensors + tokenizer + positive.txt).
    expansion_dir: Path | None = None
    #: Hugging Face cache to look in for repo ids (never downloaded from at run time).
    hf_cache_dir: Path | None = None
    output_dir: Path | None = None
    #: Delete the oldest outputs above this many bytes (None = keep everything).
    output_max_bytes: int | None = None
    output_max_age_days: float | None = None

    # -- models -------------------------------------------------------------------------------
    #: Base model name; None = the first checkpoint found, else the built-in demo model.
    default_model: str | None = None
    default_refiner: str | None = None
    #: Style names used when a request gives none; None = Fooocus's V2 + Enhance + Sharp when
    #: those styles are installed, else our own equivalents.
    default_styles: tuple[str, ...] | None = None
    preset: str | None = None

    # -- compute ------------------------------------------------------------------------------
    device: str = "auto"
    #: One worker per entry, each with its own models, all fed by the one queue: ``auto`` = every
    #: visible GPU (the CPU when there is none; with ``device`` set, that one device), else names
    #: like ``cuda:0``/``cuda:1``; ``cpu`` may repeat (several CPU workers, e.g. to test scheduling).
    devices: tuple[DeviceName, ...] = ("auto",)
    #: Dynamic batching: a worker takes up to this many queued jobs its runner can run as one batch
    #: (1 = off), waiting up to ``batch_window_ms`` for partners to arrive.
    max_batch: int = Field(default=1, ge=1, le=64)
    batch_window_ms: float = Field(default=0.0, ge=0, le=60_000)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    low_vram: bool = False
    #: Memory each device worker may keep loaded models in (checkpoints, refiner, upscaler,
    #: adapters), least recently used out first (engine/core/model_cache.py). None = automatic:
    #: a CUDA card's total minus max(4 GiB, 25 %) for activations; on the CPU half the RAM,
    #: split over the CPU workers (in low-VRAM mode the weights are in RAM: the CPU rule).
    model_memory_gb: float | None = Field(default=None, gt=0, le=100_000)
    compile: bool = False
    #: Copy Fooocus quirks that look accidental (spec §7.2 turbo/align_your_steps -> normal).
    fooocus_quirks: bool = True
    preview_every_n_steps: int = Field(default=1, ge=1)

    # -- serving ------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8188, ge=0, le=65535)
    tokens_file: Path | None = None
    #: "NAME TOKEN SCOPES" lines, as in a tokens file (HOOOCUS_TOKENS).
    tokens: str | None = None
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    public_url: str | None = None
    url_signing_key: str | None = None
    queue_size: int = Field(default=16, ge=1, le=10_000)
    max_queued_per_principal: int = Field(default=4, ge=1)
    max_message_bytes: int = Field(default=64 * 1024, ge=1024)
    event_retention_s: float = Field(default=600.0, gt=0)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    log_level: str = "info"
    #: MCP over HTTP (/mcp): open sessions in all, and per token name. At a principal's cap its
    #: least recently used idle session is ended for the new one; with none idle, or at the
    #: total, a new session gets 429 (hooocus_mcp._sdk.BoundedSessionManager).
    mcp_max_sessions: int = Field(default=256, ge=1, le=100_000)
    mcp_max_sessions_per_principal: int = Field(default=8, ge=1, le=10_000)
    #: A session with no request in flight for this long is closed (the SDK's default is 30 min,
    #: which kept abandoned sessions alive); the client re-initializes on the 404 that follows.
    mcp_session_idle_s: float = Field(default=600.0, gt=0, le=86_400)
    #: ``hooocus mcp`` (stdio): the longest JSON-RPC line read from stdin; longer ones are
    #: answered with a JSON-RPC error and skipped without being held in memory.
    mcp_stdio_max_line_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    #: Reverse proxies (addresses or CIDRs) whose X-Forwarded-For names the real client; the
    #: failed-auth limiter counts per client address. Empty = the TCP peer is the client.
    trusted_proxies: tuple[str, ...] = ()
    #: A connection must finish its request headers within this long, else it is closed.
    header_timeout_s: float = Field(default=10.0, gt=0)
    #: Open connections (HTTP + websocket) from one address; trusted proxies are exempt.
    max_connections_per_address: int = Field(default=64, ge=1)
    #: Open websocket connections per token principal (each holds an outbox of its jobs' events).
    max_ws_per_principal: int = Field(default=8, ge=1)
    #: Input images (issue 14): the largest upload or data URI, decoded bytes (the base64 text
    #: cap follows: 4/3 of it), and the most pixels an input image may decode to, checked from
    #: the header before decoding (a decompression bomb costs nothing).
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_input_pixels: int = Field(default=40_000_000, ge=64 * 64)
    #: All uploads kept (oldest out first), in memory and in ``<data_dir>/uploads``.
    uploads_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024 * 1024)
    #: Each principal's share of that (its own oldest uploads go first when it is over), so one busy
    #: token cannot evict everybody else's inputs from the shared cap.
    #: Generated images kept by content hash in ``<data_dir>/images`` (what signed URLs and
    #: ``sha256:`` references serve after a restart); oldest out first. ``outputs/`` is the user's and
    #: is never pruned.
    images_max_disk_bytes: int = Field(default=4 * 1024 * 1024 * 1024, ge=1024 * 1024)
    uploads_max_bytes_per_principal: int = Field(default=128 * 1024 * 1024, ge=1024 * 1024)

    # -- backend (issue 15) ---------------------------------------------------------------------
    #: Where jobs run: "local" = this process's GPU; "ray" = Ray Serve replicas
    #: (engine/distributed/ray_serve.py), this process keeping doors, auth, queue and history.
    backend: Literal["local", "ray"] = "local"
    #: Ray cluster to join ("auto", "ray://host:10001", ...); None = $RAY_ADDRESS, else a local Ray.
    ray_address: str | None = None
    #: Deploy the Serve application from this process (False: it was deployed by a Serve config /
    #: KubeRay RayService, deploy/ray/, and the front door only attaches to it by name).
    ray_deploy: bool = True
    #: Autoscaling bounds of the worker deployment (equal: a fixed number of replicas).
    ray_min_replicas: int = Field(default=1, ge=0, le=1024)
    ray_max_replicas: int = Field(default=1, ge=1, le=1024)
    #: Jobs in flight per replica: 1, or the batch size; a replica still runs them one at a time.
    ray_max_ongoing_requests: int = Field(default=1, ge=1, le=64)
    #: GPUs each replica reserves (0 runs replicas on CPU, as the tests do).
    ray_num_gpus_per_replica: float = Field(default=1.0, ge=0)
    #: The longest wait for the Serve application's replicas to start (placed, not yet loaded).
    ray_deploy_timeout_s: float = Field(default=300.0, gt=0)
    #: The longest wait for a replica's next event (the first one includes loading the model).
    ray_event_timeout_s: float = Field(default=600.0, gt=0)
    #: The longest wait for a name check / options answer from the cluster.
    ray_call_timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _replica_bounds(self) -> Settings:
        if self.ray_min_replicas > self.ray_max_replicas:
            raise ValueError(f"ray_min_replicas ({self.ray_min_replicas}) is above ray_max_replicas "
                             f"({self.ray_max_replicas})")
        return self

    @property
    def ray_job_slots(self) -> int:
        """Jobs the Ray workers can hold at once: the front door keeps that many in flight."""
        return self.ray_max_replicas * self.ray_max_ongoing_requests

    @field_validator("devices")
    @classmethod
    def _one_worker_per_accelerator(cls, devices: tuple[str, ...]) -> tuple[str, ...]:
        if not devices:
            raise ValueError("name at least one device (or auto)")
        if "auto" in devices and len(devices) > 1:
            raise ValueError("auto stands alone: it already means every visible GPU")
        accelerators = [d for d in devices if d != "cpu"]
        if len(set(accelerators)) != len(accelerators):
            raise ValueError("a GPU may be listed once (one job per GPU); only cpu may repeat")
        return devices

    # -- derived paths --------------------------------------------------------------------------

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def search_dirs(self, kind: Literal["checkpoints", "loras", "vae", "embeddings"]) -> tuple[Path, ...]:
        """Our own folder for ``kind`` first, then the configured extra folders."""
        extra = {"checkpoints": self.checkpoint_dirs, "loras": self.lora_dirs, "vae": self.vae_dirs,
                 "embeddings": self.embedding_dirs}[kind]
        return (self.models_dir / kind, *extra)

    @property
    def resolved_output_dir(self) -> Path:
        return self.output_dir or self.data_dir / "outputs"

    @property
    def resolved_expansion_dir(self) -> Path:
        return self.expansion_dir or self.models_dir / "prompt_expansion"

    def masked_dump(self) -> dict[str, Any]:
        """The values with secrets masked, JSON-safe."""
        out = self.model_dump(mode="json")
        for name in SECRET_FIELDS:
            if out.get(name):
                out[name] = "***"
        return out


def _coerce_env(name: str, raw: str) -> Any:
    annotation = str(Settings.model_fields[name].annotation)
    if "tuple" in annotation:
        sep = os.pathsep if "Path" in annotation else ","
        return tuple(part for part in (p.strip() for p in raw.split(sep)) if part)
    return raw


def load_settings(*, cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                  toml_path: Path | None = None) -> tuple[Settings, dict[str, str]]:
    """Build the settings and a ``{field: source}`` map (default / toml:PATH / env:NAME / cli).

    ``toml_path`` None looks for ``$HOOOCUS_CONFIG`` then ``./hooocus.toml``. CLI values that are
    None count as "not given".
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if toml_path is None:
        candidate = env.get(ENV_PREFIX + "CONFIG")
        toml_path = Path(candidate) if candidate else Path("hooocus.toml")
        if not toml_path.is_file():
            toml_path = None
    if toml_path is not None:
        try:
            data = tomllib.loads(Path(toml_path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidRequest(f"cannot read config file {toml_path}: {exc}", loc=("config",)) from None
        section = data.get("hooocus", data)
        for key, value in section.items():
            if key not in Settings.model_fields:
                raise InvalidRequest(f"{toml_path}: unknown setting {key!r}", loc=(key,))
            values[key] = value
            sources[key] = f"toml:{toml_path}"
    for name in Settings.model_fields:
        env_name = ENV_PREFIX + name.upper()
        if env_name in env and env[env_name] != "":
            values[name] = _coerce_env(name, env[env_name])
            sources[name] = f"env:{env_name}"
    for key, value in (cli or {}).items():
        if value is None:
            continue
        if key not in Settings.model_fields:
            raise InvalidRequest(f"unknown setting {key!r}", loc=(key,))
        values[key] = value
        sources[key] = "cli"
    if "data_dir" not in values:
        values["data_dir"] = default_data_dir(env)
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        raise pydantic_error_to_hooocus(exc) from None
    for name in Settings.model_fields:
        sources.setdefault(name, "default")
    return settings, sources


def settings_from_args(args: Any, *, env: Mapping[str, str] | None = None) -> tuple[Settings, dict[str, str]]:
    """The settings for a command line: every parsed flag whose destination is a Settings field
    name (``--data-dir`` -> ``data_dir``, ``--allowed-host`` -> ``allowed_hosts``) and was given
    sets that field; ``args.config`` names the toml file. The one builder every command uses.

    ``args`` is an ``argparse.Namespace`` (anything with attributes); lists become tuples."""
    cli: dict[str, Any] = {}
    for name, value in vars(args).items():
        if name in Settings.model_fields and value is not None:
            cli[name] = tuple(value) if isinstance(value, list) else value
    return load_settings(cli=cli, env=env, toml_path=getattr(args, "config", None))
