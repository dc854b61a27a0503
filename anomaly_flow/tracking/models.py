"""Logging, registering and loading the packaged model.

A logged model is an MLflow pyfunc logged from code (see :mod:`.pyfunc`) whose one
artifact, ``glow/``, holds ``config.json``, ``model.safetensors`` and, once calibrated,
``calibration.json``. :func:`load_model` reads those files directly (no pickle, no
pyfunc code run) from any of:

- ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` (the registry; ``models:/NAME/latest``
  is its highest version, as MLflow reads it),
- ``runs:/RUN_ID/model`` and ``models:/<logged model id>`` (what a run logged),
- a local MLflow model folder (with an ``MLmodel`` file),
- a local folder written by ``Glow.save`` (``config.json`` + ``model.safetensors``,
  optionally ``calibration.json`` beside them).

Registered model versions carry tags that link runs: ``training_run_id`` on every
version, ``calibration_run_id`` on calibrated ones.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import logging
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM, disable_logging, enable_logging

from anomaly_flow.calibration import Calibration, check_fitted_to
from anomaly_flow.glow import CONFIG_FILE, WEIGHTS_FILE, Glow, ModelFileError
from anomaly_flow.stopping import stops_deferred
from anomaly_flow.tracking.pyfunc import (
    CALIBRATION_FILE,
    GLOW_ARTIFACT,
    load_calibration,
    model_signature,
)
from anomaly_flow.tracking.runs import (
    Run,
    artifact_errors,
    git_commit,
    note_promoted,
    note_registered,
    note_to_promote,
)
from anomaly_flow.tracking.store import (
    TrackingError,
    configured_uri,
    ensure_configured,
    local_folder,
    missing_default_store,
    moved_location,
    password_masked,
    quiet_mlflow,
    redacted,
)
from anomaly_flow.train import resolve_device

logger = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("model_code.py")
CANDIDATE, CHAMPION = "candidate", "champion"
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+|(?i:latest))/?$")
_URI_HELP = ("use models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a model "
             "folder")


class ModelNotFoundError(ValueError):
    """No model at the given URI or path; the message says what was tried and what to do."""


@dataclass
class LoadedModel:
    """A model read back from the registry, a run or a folder.

    Attributes:
        model: The Glow, in eval mode, on the requested device.
        calibration: Its calibration, or None when uncalibrated.
        uri: The URI or path it was loaded from.
        name: Registered model name (registry URIs only).
        version: Registered version (registry URIs only).
        run_id: The run that logged it, when known.
        tags: The registered version's tags (``training_run_id``, ...), when known.
    """

    model: Glow
    calibration: Calibration | None
    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def training_run_id(self) -> str | None:
        """The run that trained the weights (the version's tag, else the logging run)."""
        return self.tags.get("training_run_id") or self.run_id


def _pip_requirements() -> list[str]:
    """What the model needs; informative for ``--env-manager local``, where the current
    environment (with anomaly-flow installed) is used as it is."""
    names = ["anomaly-flow", "mlflow", "torch", "numpy", "pandas", "pillow", "safetensors"]
    pins = []
    for name in names:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            pins.append(name)
            continue
        pins.append(f"{name}=={version.split('+')[0]}")
    return pins


def _fitted_to(calibration: Calibration, model: Glow) -> Calibration:
    """``calibration``, recording the digest of ``model``'s weights when it has none.

    Raises:
        CalibrationError: ``calibration`` records another model's digest.
    """
    digest = model.digest()
    if calibration.model_digest is None:
        return replace(calibration, model_digest=digest)
    check_fitted_to(calibration, digest, advice="log it with the model it was fitted to, or "
                    "calibrate this model (anomaly-flow calibrate)")
    return calibration


def log_model(run: Run, model: Glow, calibration: Calibration | None = None,
              artifact_path: str = "model") -> str:
    """Log ``model`` (and its calibration) as a pyfunc in ``run``, which must be active.

    A calibration that does not yet record the digest of the weights it was fitted to
    (:attr:`Calibration.model_digest`) is logged with ``model``'s.

    Returns:
        The logged model's URI (``models:/m-...``); ``runs:/<run_id>/<artifact_path>``
        names the same model.

    Raises:
        CalibrationError: ``calibration`` was fitted to a model with other weights.
    """
    active = mlflow.active_run()
    if active is None or active.info.run_id != run.run_id:
        raise ValueError(f"log_model needs run {run.run_id} to be the active run; call it "
                         "inside its `with start_run(...)` block (innermost).")
    if calibration is not None:
        calibration = _fitted_to(calibration, model)
    # a stop (Ctrl-C, SIGTERM) waits for the model's files and row to be written
    with tempfile.TemporaryDirectory() as tmp, quiet_mlflow(), stops_deferred(), \
            artifact_errors():
        folder = model.save(Path(tmp) / GLOW_ARTIFACT)
        if calibration is not None:
            (folder / CALIBRATION_FILE).write_text(calibration.to_json(indent=2))
        info = mlflow.pyfunc.log_model(
            name=artifact_path,
            python_model=str(MODEL_CODE),
            artifacts={GLOW_ARTIFACT: str(folder)},
            signature=model_signature(model),
            # declared, so that a model_config given at load time reaches load_context:
            # MLflow passes one only to a model logged with one
            model_config={"device": "auto"},
            pip_requirements=_pip_requirements(),
            metadata={"anomaly_flow": {"calibrated": calibration is not None,
                                       "score_name": getattr(calibration, "score_name", None)}},
        )
    logger.info("logged model %s in run %s", info.model_uri, run.run_id)
    return info.model_uri


@contextlib.contextmanager
def _without_registration_chatter() -> Iterator[None]:
    """Silence MLflow's event stream while registering: ``mlflow.register_model`` prints
    "Successfully registered model ..." and "Created version ..." there for every call.

    The switch is MLflow's own and process-wide, so MLflow's log lines from the same
    moment (a warning from another thread too) are dropped with the chatter; failures
    still raise. Left on when MLflow's INFO logs are asked for (``-v``).
    """
    if logging.getLogger("mlflow").getEffectiveLevel() <= logging.INFO:
        yield
        return
    was_enabled = MLFLOW_LOGGING_STREAM.enabled
    disable_logging()
    try:
        yield
    finally:
        if was_enabled:
            enable_logging()


def register_model(model_uri: str, name: str, *, alias: str | None = None,
                   tags: dict[str, Any] | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name`` (created if new).

    Args:
        model_uri: What :func:`log_model` returned (``models:/m-...``), or
            ``runs:/RUN_ID/PATH``, a registry URI or a local MLflow model folder.
        name: The registered model's name.
        alias: An alias to point at the new version.
        tags: Tags for the new version; values are stored as strings.

    Returns:
        The new version number, as a string.
    """
    ensure_configured()
    # a stop waits for the version, its tags and its alias: a version without the alias
    # it was meant to get would look like a failed registration
    with _without_registration_chatter(), stops_deferred():
        version = mlflow.register_model(
            model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()} or None)
        note_registered(f"models:/{name}/{version.version}")
        if alias:
            set_alias(name, alias, version.version)
    logger.info("registered %s as models:/%s/%s%s", model_uri, name, version.version,
                f" (alias {alias})" if alias else "")
    return str(version.version)


OWNER_TAG = "anomaly_flow.owner"
"""The registered-model tag :func:`claim_model_name` sets and checks."""


def claim_model_name(name: str, owner: str, *, check: bool = True) -> None:
    """Make registered model ``name`` one that ``owner`` (e.g. ``"demo"``) may add versions
    to and move the aliases of: created now with the tag :data:`OWNER_TAG` = ``owner``, or
    holding that tag already. ``check=False`` takes over a model without the tag (a store
    that is ``owner``'s anyway).

    Raises:
        TrackingError: The model exists and someone else made it (a shared server holding a
            model of the same name): its aliases stay where they are.
    """
    uri = ensure_configured()
    client = mlflow.MlflowClient()
    with stops_deferred():
        try:
            existing = client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            with contextlib.suppress(MlflowException):  # unless made concurrently: checked below
                client.create_registered_model(name, tags={OWNER_TAG: owner})
            existing = client.get_registered_model(name)
        tag = existing.tags.get(OWNER_TAG)
        if tag == owner:
            return
        if check:
            versions = len(client.search_model_versions(f"name = '{name}'"))
            raise TrackingError(
                f"the MLflow store {redacted(uri)} already holds a registered model {name!r} "
                f"that anomaly-flow's {owner} did not make ({versions} version(s), no tag "
                f"{OWNER_TAG}={owner}); the {owner} would add versions to it and move its "
                "aliases, so it stops here: unset MLFLOW_TRACKING_URI to use a store of its "
                f"own, rename or delete that model, or, if an earlier {owner} made it, tag it "
                f"{OWNER_TAG}={owner} (MlflowClient().set_registered_model_tag)")
        client.set_registered_model_tag(name, OWNER_TAG, owner)


_OUR_VERSION_TAGS = ("training_run_id", "calibration_run_id")
"""Tags every version train or calibrate registers carries."""


def check_not_foreign(name: str) -> None:
    """Refuse to add versions to registered model ``name`` where it holds versions and
    none is anomaly-flow's (tagged as in :data:`_OUR_VERSION_TAGS`): another team's model
    of the same name on a shared server, whose alias ``candidate`` would move. A model
    :func:`claim_model_name` marks as a tool's own is checked there instead.

    Raises:
        TrackingError: The model's versions are all someone else's.
    """
    try:
        versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    except MlflowException:  # a name MLflow's filter cannot quote: nothing to compare
        return
    if versions and not any(key in v.tags for v in versions for key in _OUR_VERSION_TAGS):
        raise TrackingError(
            f"the MLflow store {redacted(mlflow.get_tracking_uri())} already holds a "
            f"registered model {name!r} that anomaly-flow did not register ({len(versions)} "
            f"version(s), none tagged {' or '.join(_OUR_VERSION_TAGS)}); training would add "
            f"a version to it and move its alias {CANDIDATE!r}, so it stops here: train "
            "under another --name, or rename or delete that model")


def _check_still_registered(name: str, version: str) -> None:
    """Refuse to add a calibrated version to a registered model whose source version (or
    the whole name) was deleted since it was loaded: MLflow would register it anyway, the
    name made afresh if need be, with a ``source_version`` naming a version that is gone
    (and ``--promote`` its champion)."""
    client = mlflow.MlflowClient()
    try:
        client.get_model_version(name, version)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:  # which of the two is gone: only asked when one is
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ModelNotFoundError(
            f"the registered model {name!r} was deleted while version {version} was being "
            f"calibrated, so no version was added (MLflow would have made {name!r} anew); "
            "register the model again (train it, or register its training run's model) "
            "and calibrate that version") from None
    raise ModelNotFoundError(
        f"version {version} of the registered model {name!r} was deleted while it was "
        "being calibrated, so no version was added (its source_version would name a "
        "version that is gone); calibrate a version that is registered")


def set_alias(name: str, alias: str, version: str | int) -> None:
    """Point ``models:/name@alias`` at ``version``."""
    ensure_configured()
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))


class RegisteredVersion(NamedTuple):
    """A calibrated version :func:`register_calibrated_version` registered."""

    uri: str  # models:/NAME/VERSION
    version: str
    previous_champion: str | None  # the version ``champion`` left, where it was moved


def register_calibrated_version(source: LoadedModel, calibration: Calibration, run: Run, *,
                                promote: bool, name: str | None = None,
                                calibration_fingerprint: str | None = None
                                ) -> RegisteredVersion:
    """Log ``source``'s weights with ``calibration`` in ``run`` and register them.

    The new version of ``name`` (default: the source's registered name) is tagged with
    ``calibration_run_id``, ``training_run_id`` (when known), ``source_version``, the
    source's ``data_fingerprint`` and ``val_bpd`` (where it has them), the calibration
    images' ``calibration_fingerprint`` (where given), this code's ``git_commit`` (from a
    checkout), the score, the threshold and what chose it (``threshold_method``,
    ``target_fpr`` for a conformal threshold, ``cost_fp``/``cost_fn`` for a cost one);
    ``promote`` moves the ``champion`` alias to it, then tags it ``previous_champion``
    with the version the alias left (so a promotion can be undone). The run is tagged
    with the same links.

    Returns:
        The new version's URI and number, and the version ``champion`` left.

    Raises:
        ModelNotFoundError: The source is not a registered version and no ``name`` is
            given (a run or folder has no name to register under).
    """
    target = name or source.name
    if not target:
        raise ModelNotFoundError(
            f"{source.uri} is not a registered model version, so there is no model name to "
            "add the calibrated version to; load it as models:/NAME@ALIAS or give a name.")
    links = {"calibration_run_id": run.run_id, "source_model_uri": source.uri}
    if source.training_run_id:
        links["training_run_id"] = source.training_run_id
    if source.version and target == source.name:
        links["source_version"] = source.version
    threshold = calibration.threshold
    # what the weights were trained on and how well, on the version itself: an audit of
    # the champion reads them there, not through a chain of recalibrated versions
    lineage = {key: source.tags[key] for key in ("data_fingerprint", "val_bpd")
               if key in source.tags}
    if calibration_fingerprint is not None:
        lineage["calibration_fingerprint"] = calibration_fingerprint
    if commit := git_commit():
        lineage["git_commit"] = commit
    tags = {**links, **lineage, "calibrated": "true", "score_name": calibration.score_name,
            "threshold": repr(float(threshold.value)), "threshold_method": threshold.method}
    chosen_by = {"target_fpr": threshold.alpha, "cost_fp": threshold.cost_fp,
                 "cost_fn": threshold.cost_fn}
    tags.update({key: repr(float(value)) for key, value in chosen_by.items()
                 if value is not None})
    run.set_tags(links)
    model_uri = log_model(run, source.model, calibration)
    if source.version and target == source.name:
        _check_still_registered(target, source.version)
    previous = None
    with stops_deferred():  # a stop lets --promote finish what the registration began
        version = register_model(model_uri, target, tags=tags)
        if promote:
            note_to_promote(f"models:/{target}/{version}")
            _, previous = promote_version(target, str(version))
    return RegisteredVersion(f"models:/{target}/{version}", str(version), previous)


def undo_command(name: str, version: str) -> str:
    """The command that points ``champion`` back at ``version``."""
    return f"anomaly-flow promote models:/{name}/{version}"


def promote_version(name: str, version: str) -> tuple[bool, str | None]:
    """Point ``models:/name@champion`` at ``version``, then tag the version with
    ``previous_champion``, the version the alias left (once it moved: a failure before
    leaves no such word), so that the promotion can be undone. Returns whether the alias
    moved (not where it pointed at ``version`` already) and the version it left (None
    where it pointed at none)."""
    previous = alias_version(name, CHAMPION)
    if previous == str(version):
        return False, previous
    with stops_deferred():  # the alias and its record, as one step
        set_alias(name, CHAMPION, version)
        if previous is not None:
            _tag_version(name, version, "previous_champion", previous)
        note_promoted(f"moved alias {CHAMPION!r} of {name!r} to version {version}" + (
            "" if previous is None else
            f" from {previous} (to undo: {undo_command(name, previous)})"),
            f"models:/{name}/{version}")
    logger.info("alias %s now points at models:/%s/%s%s", CHAMPION, name, version,
                "" if previous is None else f" (it pointed at version {previous})")
    return True, previous


def _tag_version(name: str, version: str | int, key: str, value: str) -> None:
    ensure_configured()
    with quiet_mlflow():
        mlflow.MlflowClient().set_model_version_tag(name, str(version), key, value)


def alias_version(name: str, alias: str) -> str | None:
    """The version ``models:/name@alias`` points at, or None where the alias is unset."""
    ensure_configured()
    try:
        with quiet_mlflow():
            return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


# --------------------------------------------------------------------------- loading


def is_local_model_uri(uri: str) -> bool:
    """Whether ``uri`` names a model folder on disk rather than one in an MLflow store."""
    return _local_path(str(uri)) is not None


def _local_path(uri: str) -> Path | None:
    """The local path ``uri`` names, or None for a store URI."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", uri):
        return None
    return Path(uri).expanduser()


def _glow_folder(model_dir: Path) -> Path:
    """The ``glow`` artifact folder inside an MLflow model folder."""
    try:
        flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
        relative = flavor.get("artifacts", {}).get(GLOW_ARTIFACT, {}).get("path")
    except Exception as exc:  # an unreadable MLmodel file
        raise ModelNotFoundError(
            f"cannot read {model_dir / 'MLmodel'} ({' '.join(str(exc).split())}); copy or "
            "download the model folder again, or use the registered model "
            "(models:/NAME@ALIAS)") from None
    folder = model_dir / relative if relative else model_dir / "artifacts" / GLOW_ARTIFACT
    if not (folder / CONFIG_FILE).is_file():
        raise ModelNotFoundError(
            f"the MLflow model in {model_dir} is not an anomaly-flow model (no "
            f"{GLOW_ARTIFACT}/{CONFIG_FILE} artifact); log it with anomaly-flow")
    return folder


def _read(folder: Path, uri: str, device: str, **where: Any) -> LoadedModel:
    model = Glow.load(folder, resolve_device(device))
    return LoadedModel(model, load_calibration(folder, model), uri, **where)


def _load_local(path: Path, uri: str, device: str) -> LoadedModel:
    if (path / "MLmodel").is_file():
        run_id = None
        with contextlib.suppress(Exception):  # informative only; _glow_folder reports it
            run_id = Model.load(str(path)).run_id
        return _read(_glow_folder(path), uri, device, run_id=run_id)
    if (path / CONFIG_FILE).is_file():
        return _read(path, uri, device)
    if path.is_dir():
        raise ModelNotFoundError(
            f"{path} holds no model: a model folder has an MLmodel file, or {CONFIG_FILE} "
            f"and {WEIGHTS_FILE} written by Glow.save; {_URI_HELP}")
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file, not a model folder; give the folder "
                                 f"that holds the model's MLmodel file; {_URI_HELP}")
    raise ModelNotFoundError(f"no model at {uri}: that path does not exist; {_URI_HELP}")


def _files_location(source: str) -> str | None:
    """Where the store keeps the files of a ``models:/`` or ``runs:/`` URI (a local path
    for a ``file:`` location), or None when that cannot be told."""
    with contextlib.suppress(Exception):  # informative only
        if source.startswith("models:/"):
            location = ModelsArtifactRepository.get_underlying_uri(source)
        elif source.startswith("runs:/"):
            location = (_logged_model_location(source)
                        or RunsArtifactRepository.get_underlying_uri(source))
        else:
            return None
        folder = local_folder(location)
        return location if folder is None else str(folder)
    return None


def _logged_model_location(source: str) -> str | None:
    """Where the store keeps the model ``runs:/RUN/NAME`` names: MLflow 3 keeps a model
    logged in a run apart from the run's own artifacts, and reads the run's first logged
    model of that name (as MLflow's runs repository does); None where the run logged none."""
    run_id, path = RunsArtifactRepository.parse_runs_uri(source)
    name, _, below = (path or "").strip("/").partition("/")
    if not name or "'" in name:
        return None
    client = mlflow.MlflowClient()
    token = None
    try:  # a server without logged models' search: the run's own artifacts then
        experiment = client.get_run(run_id).info.experiment_id
        while True:
            page = client.search_logged_models(experiment_ids=[experiment], page_token=token,
                                               filter_string=f"name = '{name}'")
            for logged in page:
                if logged.source_run_id == run_id:
                    return "/".join(filter(None, [ModelsArtifactRepository.get_underlying_uri(
                        f"models:/{logged.model_id}").rstrip("/"), below]))
            if not (token := page.token):
                return None
    except Exception:  # MLflow's stores raise many types
        return None


def registered_from_run(run_id: str, model_id: str | None
                        ) -> tuple[str, str, dict[str, str]] | None:
    """``(name, version, tags)`` of the registered version of the model ``model_id`` that
    run ``run_id`` logged (a resumed training logs and registers more than one), or None
    when that model was not registered."""
    try:
        versions = mlflow.MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    except MlflowException:
        return None
    mine = [mv for mv in versions if model_id and model_id in (
        getattr(mv, "model_id", None), str(mv.source).removeprefix("models:/"))]
    if len(mine) != 1:
        return None
    return mine[0].name, str(mine[0].version), dict(mine[0].tags or {})


def _other_names(client: mlflow.MlflowClient, name: str) -> str:
    """The registered names, for a message about ``name`` that is not one: the closest
    first as a suggestion (a case or a letter off), else up to ten of them."""
    try:
        names = sorted(m.name for m in client.search_registered_models(max_results=1000))
    except MlflowException:
        return ""
    if not names:
        return " (it holds no registered models)"
    folded = {other.lower(): other for other in names}
    close = difflib.get_close_matches(name.lower(), list(folded), n=1, cutoff=0.8)
    if close:
        return f" (did you mean {folded[close[0]]!r}?)"
    shown = ", ".join(names[:10]) + (f", and {len(names) - 10} more" if len(names) > 10 else "")
    return f" (its models: {shown})"


def _registry_entry(uri: str) -> tuple[str, str, str | None, dict[str, str]] | None:
    """``(name, version, run_id, tags)`` for a registry URI, None for other URIs."""
    client = mlflow.MlflowClient()
    by_alias, by_version = _ALIAS_URI.match(uri), _VERSION_URI.match(uri)
    if not (by_alias or by_version):
        return None
    name = (by_alias or by_version)["name"]  # type: ignore[index]
    try:
        registered = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # a damaged or unreachable store, not a missing name: said as such
        raise ModelNotFoundError(
            f"no registered model {name!r} in {redacted(mlflow.get_registry_uri())}"
            f"{_other_names(client, name)}; train one with "
            f"`anomaly-flow train DATA --name {name}`, or point --mlruns / "
            "MLFLOW_TRACKING_URI at the store that holds it") from None
    version = by_version["version"] if by_version else None
    if version is not None and version.lower() == "latest":  # as MLflow reads it
        numbers = [int(mv.version) for mv in registered.latest_versions or []]
        if not numbers:
            raise ModelNotFoundError(
                f"registered model {name!r} has no versions yet, so models:/{name}/latest "
                f"names none; train one with `anomaly-flow train DATA --name {name}`")
        version = str(max(numbers))
    try:
        if by_alias:
            mv = client.get_model_version_by_alias(name, by_alias["alias"])
        elif int(version) < 2**63:  # type: ignore[arg-type]  # sqlite's INTEGER
            mv = client.get_model_version(name, version)
        else:
            mv = None  # past any version number
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        mv = None
    if mv is None:
        aliases = sorted(registered.aliases) if registered.aliases else []
        if by_alias:
            raise ModelNotFoundError(
                f"registered model {name!r} has no alias {by_alias['alias']!r} (its aliases: "
                f"{', '.join(aliases) or 'none'}); use one of those, a version "
                f"(models:/{name}/N), or set the alias (e.g. calibrate --promote)") from None
        raise ModelNotFoundError(
            f"registered model {name!r} has no version {version}; "
            f"see its versions in the MLflow UI, or use models:/{name}@{CANDIDATE}") from None
    return name, str(mv.version), mv.run_id, dict(mv.tags or {})


def require_store(uri: str, mlruns: str | Path | None = None) -> None:
    """Refuse a registry or run URI when the store it would be read from does not exist,
    rather than create an empty store (and a ``mlruns/`` folder) while failing.

    Raises:
        ModelNotFoundError: ``uri`` is not a local folder, ``MLFLOW_TRACKING_URI`` is
            unset and the default store under ``mlruns`` (``./mlruns``) has no database.
    """
    if _local_path(str(uri)) is not None:
        return
    missing = missing_default_store(mlruns)
    if missing is not None and missing.is_file():  # there, but empty
        raise ModelNotFoundError(
            f"cannot load {uri}: {missing} is an empty file, not an MLflow store (nothing "
            "was trained or logged there); train a model first (anomaly-flow train DATA "
            "--name NAME), or point --mlruns / MLFLOW_TRACKING_URI at the store that holds "
            "it")
    if missing is not None and missing.exists():
        raise ModelNotFoundError(
            f"cannot load {uri}: {missing} is not a file, where the MLflow store's sqlite "
            "database goes; move it away, or point --mlruns / MLFLOW_TRACKING_URI at the "
            "store that holds the model")
    if missing is not None:
        raise ModelNotFoundError(
            f"cannot load {uri}: there is no MLflow store at {missing} (nothing was trained "
            "or logged there); train a model first (anomaly-flow train DATA --name NAME), or "
            "point --mlruns / MLFLOW_TRACKING_URI at the store that holds it")


_COPY_FAILED = re.compile(r"\[Errno (\d+)\] ([^\n]+?): '[^'\n]*' -> '([^'\n]*)'")
"""A file MLflow failed to copy, in the message of its download error: errno, reason and
destination."""


def _refuse_failed_copy(error: Exception, uri: str, tmp: Path) -> None:
    """Say so when loading failed because the model's files could not be written into the
    temporary folder (a full /tmp, say), not because they are missing.

    Raises:
        ModelNotFoundError: ``error`` is such a failure.
    """
    failed = _COPY_FAILED.search(str(error))
    if failed is None or not Path(failed[3]).is_relative_to(tmp):
        return
    number, reason = int(failed[1]), failed[2]
    fix = ("free space there, or point TMPDIR at a folder with room"
           if number in (errno.ENOSPC, errno.EDQUOT) else
           "check that folder, or point TMPDIR at another one")
    raise ModelNotFoundError(
        f"cannot load {uri}: its files are in the store, but copying them into the temporary "
        f"folder {tmp.parent} failed ({reason}); {fix}") from None


def load_model(uri: str, device: str = "cpu") -> LoadedModel:
    """Load a model and its calibration from a registry URI, run URI or folder.

    Args:
        uri: See the module docstring for the accepted forms.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Raises:
        ModelNotFoundError: Nothing loadable at ``uri``; the message says what to do.
        TrainingError: ``device`` is not ``auto``, ``cpu`` or ``cuda[:N]``, or names a
            CUDA device this machine lacks (:func:`anomaly_flow.train.resolve_device`).
    """
    uri = str(uri)
    local = _local_path(uri)
    if local is not None:
        return _load_local(local, uri, device)
    bare = re.fullmatch(r"models:/([^/@]+)/?", uri)
    if bare is not None and not re.fullmatch(r"m-[0-9a-f]{32}", bare.group(1)):  # model id
        name = bare.group(1)
        raise ModelNotFoundError(
            f"{uri} names a model but not which of its versions; use "
            f"models:/{name}@{CANDIDATE}, models:/{name}@{CHAMPION} or models:/{name}/VERSION")
    if configured_uri() is None:  # configuring would create the default store
        require_store(uri)
    ensure_configured()
    name = version = run_id = None
    tags: dict[str, str] = {}
    entry = _registry_entry(uri)
    if entry is not None:
        name, version, run_id, tags = entry
    elif uri.startswith("runs:/"):
        run_id = uri[len("runs:/"):].split("/", 1)[0]
    # an alias is read once: the files come from the version it named then, even if a
    # --promote moves it meanwhile
    source = uri if name is None else f"models:/{name}/{version}"
    with tempfile.TemporaryDirectory() as tmp, quiet_mlflow():
        try:
            model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=source,
                                                                 dst_path=tmp))
        except ImportError as exc:  # s3://, gs://, ...: the storage's client library
            raise ModelNotFoundError(
                f"cannot read {uri}: MLflow needs the Python package {exc.name!r} for that "
                "storage, and it is not installed; install it (boto3 for s3://, "
                "google-cloud-storage for gs://, azure-storage-blob for wasbs://), or copy "
                "the model to a local folder and give that") from None
        except Exception as exc:  # MLflow's stores raise many types for what is not there
            _refuse_failed_copy(exc, uri, Path(tmp))
            first = password_masked((str(exc).strip().splitlines()
                                     or [type(exc).__name__])[0], mlflow.get_tracking_uri())
            if re.match(r"https?://", uri, re.IGNORECASE):
                # a server's answer says something; a Python error from MLflow's parsing of
                # the address (not enough values to unpack) says nothing to the user
                said = "" if isinstance(exc, ValueError | TypeError | LookupError) \
                    else f" ({password_masked(first, uri)})"
                raise ModelNotFoundError(
                    f"cannot load a model from the web address {redacted(uri)}{said}: "
                    "MLflow reads such an address only as "
                    "a model folder on an MLflow artifact server; download the model folder "
                    f"and give its local path, or {_URI_HELP}") from None
            raise ModelNotFoundError(
                f"no model at {uri} in {redacted(mlflow.get_tracking_uri())} ({first}); "
                f"{_URI_HELP}, and check --mlruns / MLFLOW_TRACKING_URI") from None
        if not any(model_dir.iterdir()):  # none copied: the store's files are elsewhere
            where = _files_location(source)
            if (moved := moved_location(where)) is None:
                raise ModelNotFoundError(
                    f"{uri} is known to {redacted(mlflow.get_tracking_uri())}, but none of "
                    f"its files came from the artifact store"
                    f"{f' (MLflow looked in {where})' if where else ''}: the store's "
                    "artifacts folder (for the default store, mlruns/artifacts beside "
                    "mlflow.db) was moved or deleted (MLflow records absolute paths, so a "
                    "moved or copied store still looks in the old place); put it back, or "
                    "train and register the model again")
            logger.warning("the files of %s are recorded at %s, which is gone; reading them "
                           "from %s, below this store's artifacts folder (was the store "
                           "moved? MLflow keeps the absolute paths of where it was made, and "
                           "its experiments still log to them)", uri, where, moved)
            model_dir = moved
        if not (model_dir / "MLmodel").is_file():
            raise ModelNotFoundError(
                f"{uri} exists but is not an MLflow model (no MLmodel file); {_URI_HELP}")
        if run_id is None:
            with contextlib.suppress(Exception):  # informative only
                run_id = Model.load(str(model_dir)).run_id
        elif name is None:  # a run URI: the registered version of the model it names
            registered = registered_from_run(run_id, Model.load(str(model_dir)).model_id)
            if registered is not None:
                name, version, tags = registered
        try:
            return _read(_glow_folder(model_dir), uri, device, name=name, version=version,
                         run_id=run_id, tags=tags)
        except (ModelFileError, ModelNotFoundError) as exc:
            # name where the store keeps the files, not the temporary copy, which is gone
            # by the time the user reads the message
            location = _files_location(source)
            stored = (location.rstrip("/") if location
                      else f"<the files of {uri} in {redacted(mlflow.get_tracking_uri())}>")
            raise type(exc)(str(exc).replace(str(model_dir), stored)) from None
