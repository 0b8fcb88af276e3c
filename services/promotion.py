"""Champion/challenger promotion: move the ``champion`` alias only to a version that is measurably better.

    suite = ImageSetSuite("data/synthreid/target/synth_target")          # query/ + bounding_box_test/
    decision = promote("dynamix-reid", "7", suite, metric="mAP", margin=0.01, tracking_uri=uri)
    print(decision.table())

The challenger and the current champion are both loaded from the registry and evaluated, in the
same call, on the same fixed suite (never a score remembered from training, which may come from
another data set or an older evaluation code). The challenger becomes champion when
``challenger > champion + margin`` on ``metric``, or when there is no champion yet.

Aliases: ``champion`` is the served version; on a promotion the replaced version gets
``previous-champion`` (so a rollback is one ``set_registered_model_alias``), and every version stays
addressable by its number. Record: the challenger's version tags ``promotion.decision``
(``promoted`` / ``rejected`` / ``error``), ``promotion.metric``, ``promotion.margin``,
``promotion.challenger_score``, ``promotion.champion_score``, ``promotion.champion_version`` (the
version compared against; empty when there was none), ``promotion.suite``, ``promotion.message``
and ``promotion.timestamp`` (UTC, ISO 8601). All of them are rewritten on every attempt.

Failure: if anything fails before the aliases move (a version that does not load, a suite that
raises, a metric the suite does not report), the aliases are left as they were and the challenger
is tagged ``promotion.decision=error`` with the message. Concurrent promotions of one model are not
serialised: run them from one scheduler.

Shape legend: B batch, N images of a split, D embedding dim, H/W image height/width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal, Mapping, Protocol

import numpy as np

from services.registry import load_embedding_model, registry_client

CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
TAG_PREFIX = "promotion."
#: longest ``promotion.message`` tag kept (an exception's text can be long; registry tag values are bounded)
MAX_MESSAGE_CHARS = 1000

Decision = Literal["promoted", "rejected", "error"]
#: ``embed(images) -> emb_BD float32``: the registered model's ``predict``, which takes encoded images
#: (JPEG/PNG bytes), raw uint8 pixels, or preprocessed float32 ``(B, 3, H, W)`` (services/embedding_model.py)
EmbedFn = Callable[[object], np.ndarray]


class EvaluationSuite(Protocol):
    """A fixed evaluation: embeds its images with ``embed`` and returns retrieval metrics
    (``{"mAP": ..., "rank1": ...}``). ``name`` is recorded in the ``promotion.suite`` tag (a plain
    callable is accepted too and recorded by its type name)."""

    name: str

    def __call__(self, embed: EmbedFn) -> Mapping[str, float]: ...


@dataclass
class ImageSetSuite:
    """Query/gallery evaluation on a data set on disk, read by one of the project's parsers
    (a Market-layout folder with ``query/`` and ``bounding_box_test/``, e.g. the SynthReID target
    domain). The listing is strict: an unreadable name fails the suite rather than silently
    changing it. The encoded images go to the model batch by batch as they are on disk: the model
    decodes and preprocesses them with the preprocessing stored with it (the training run's test
    view), so every version is scored as it will be served; metrics are those of :func:`dynamix_core.evaluation.evaluate_features`
    (SPEC 3). Only the (N, D) features are kept, so memory does not grow with image size."""

    root: str | Path
    fmt: str = "market1501"
    batch_size: int = 64
    _splits: dict = field(default_factory=dict, init=False, repr=False)  # split -> (samples, pids, camids)

    @property
    def name(self) -> str:
        return f"{self.fmt}:{self.root}"

    def _listing(self) -> dict:
        """Per split ("query", "gallery"): (samples, global pids, global camids); parsed once."""
        if not self._splits:
            from dynamix_core.data.parsers import parse_source
            from dynamix_core.data.records import BadInputError, IdentityMaps, InputReport

            samples = parse_source(self.fmt, self.root, InputReport(strict=True))
            maps = IdentityMaps.build(samples)
            for split in ("query", "gallery"):
                part = [s for s in samples if s.split == split]
                if not part:
                    raise BadInputError(f"evaluation suite {self.root}: no {split} images; it needs query/ and bounding_box_test/")
                records = [maps.record(s) for s in part]
                self._splits[split] = (part, np.array([r.pid for r in records]), np.array([r.camid for r in records]))
        return self._splits

    def __call__(self, embed: EmbedFn) -> dict[str, float]:
        from dynamix_core.evaluation import evaluate_features

        splits = self._listing()
        feats = {}
        for split, (samples, _, _) in splits.items():
            chunks_BD = []
            for start in range(0, len(samples), self.batch_size):
                batch = samples[start:start + self.batch_size]
                chunks_BD.append(embed([s.image.read_bytes() for s in batch]))
            feats[split] = np.concatenate(chunks_BD)
        (_, q_pids, q_camids), (_, g_pids, g_camids) = splits["query"], splits["gallery"]
        result = evaluate_features(feats["query"], feats["gallery"], q_pids, g_pids, q_camids, g_camids, max_rank=10)
        cmc = result["cmc"]
        return {"mAP": result["mAP"], "mINP": result["mINP"], "rank1": float(cmc[0]),
                "rank5": float(cmc[4]), "rank10": float(cmc[9])}


@dataclass(frozen=True)
class PromotionDecision:
    """What :func:`promote` decided, with both scores (None where not measured)."""

    name: str
    challenger_version: str
    decision: Decision
    metric: str
    margin: float
    challenger_score: float | None
    champion_version: str | None
    champion_score: float | None
    suite: str
    message: str
    timestamp: str

    def tags(self) -> dict[str, str]:
        """The ``promotion.*`` version tags recorded on the challenger ('' = not applicable)."""
        def text(value) -> str:
            return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))

        return {TAG_PREFIX + k: text(v) for k, v in (
            ("decision", self.decision), ("metric", self.metric), ("margin", self.margin),
            ("challenger_score", self.challenger_score), ("champion_score", self.champion_score),
            ("champion_version", self.champion_version), ("suite", self.suite),
            ("message", self.message[:MAX_MESSAGE_CHARS]), ("timestamp", self.timestamp),
        )}

    def table(self) -> str:
        """A small human-readable decision table."""
        def score(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        rows = [("role", "version", self.metric),
                ("challenger", self.challenger_version, score(self.challenger_score)),
                ("champion", self.champion_version or "-", score(self.champion_score))]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join([f"model {self.name}, margin {self.margin:g}", *lines,
                          f"decision: {self.decision} - {self.message}"])


def _alias_version(client, name: str, alias: str) -> str | None:
    aliases = client.get_registered_model(name).aliases  # {alias: version}
    return str(aliases[alias]) if alias in aliases else None


def _score(name: str, version: str, suite: EvaluationSuite, metric: str, tracking_uri: str) -> float:
    """``metric`` of version ``version`` on ``suite``, the model loaded from the registry."""
    model = load_embedding_model(name, version, tracking_uri)
    scores = suite(model.predict)
    if metric not in scores:
        raise KeyError(f"the suite reports no {metric!r}; it reports {sorted(scores)}")
    return float(scores[metric])


def _decide(challenger: str, challenger_score: float, champion: str | None, champion_score: float | None,
            margin: float) -> tuple[Decision, str]:
    if champion is None:
        return "promoted", f"no champion yet; {CHAMPION} -> {challenger}"
    if challenger_score > champion_score + margin:
        return "promoted", (f"{challenger_score:.4f} > {champion_score:.4f} + {margin:g}; {CHAMPION} -> {challenger}, "
                            f"{PREVIOUS_CHAMPION} -> {champion}")
    return "rejected", f"{challenger_score:.4f} <= {champion_score:.4f} + {margin:g}; {CHAMPION} stays {champion}"


def promote(name: str, challenger_version: str | int, suite: EvaluationSuite, *, tracking_uri: str,
            metric: str = "mAP", margin: float = 0.0) -> PromotionDecision:
    """Evaluate version ``challenger_version`` of ``name`` and the current champion on ``suite``;
    make the challenger champion if it beats the champion by more than ``margin`` on ``metric``
    (or if there is none). The decision is recorded as version tags and returned."""
    challenger = str(challenger_version)
    client = registry_client(tracking_uri)
    client.get_model_version(name, challenger)  # an unknown name/version is a usage error: raise it
    champion = _alias_version(client, name, CHAMPION)
    challenger_score = champion_score = None
    try:
        if champion == challenger:
            decision, message = "rejected", f"version {challenger} is already the champion"
        else:
            challenger_score = _score(name, challenger, suite, metric, tracking_uri)
            if champion is not None:
                champion_score = _score(name, champion, suite, metric, tracking_uri)
            decision, message = _decide(challenger, challenger_score, champion, champion_score, margin)
            if decision == "promoted":
                if champion is not None:  # first: an interruption between the two never loses the served version
                    client.set_registered_model_alias(name, PREVIOUS_CHAMPION, champion)
                client.set_registered_model_alias(name, CHAMPION, challenger)
    except Exception as exc:  # the contract: any failure is recorded on the challenger, never raised half-way
        decision, message = "error", f"{type(exc).__name__}: {exc}"
    result = PromotionDecision(
        name=name, challenger_version=challenger, decision=decision, metric=metric, margin=float(margin),
        challenger_score=challenger_score, champion_version=champion, champion_score=champion_score,
        suite=getattr(suite, "name", type(suite).__name__), message=message,
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    for key, value in result.tags().items():
        client.set_model_version_tag(name, challenger, key, value)
    return result
