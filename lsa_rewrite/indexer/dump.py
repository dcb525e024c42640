"""The calibration dump: what a teacher-forced pass records for backbone-free indexer training.

A directory (docs/indexer.md, "The calibration dump") with ``manifest.json`` and
``shard-00000.safetensors``, ...; each shard holds whole documents' window records, tensors named
``"{window}.{field}"``. ``DumpWriter`` writes it (atomic shard and manifest writes, resumable),
``CalibrationDump`` reads it, ``golden_labels`` derives the golden chunks from the recorded masses.

Not here: running the model (``calibrate.py``), choosing documents (``documents.py``), training.
"""

from __future__ import annotations

import json
import os
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from ..config import always_resident_chunks

DUMP_TYPE = "LSACalibrationDump"
DUMP_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
# Fields of a window record. "query" (optional): the model's post-rotary query of each target layer at
# the query position, [Lt, Hq, D]; it lets training initialise from the dump and score the query-aware
# baseline.
REQUIRED_FIELDS = ("hidden", "kmin", "kmax", "mass", "golden", "meta")
ROPE_FIELDS = ("cos", "sin")
OPTIONAL_FIELDS = ("query",)
# Manifest entries that must not change when an interrupted dump is resumed.
STATIC_KEYS = ("model", "lsa_config", "target_layers", "label", "shapes")


DEFAULT_TOP_P = 0.3
# Golden-label rules. "mean": the nucleus of the layer-averaged attention shares; "vote": a per-layer
# nucleus and a vote of ``min_layers`` layers (the paper's form; manifests written before the choice
# existed call it "nucleus").
LABEL_RULES = ("mean", "vote")
DEFAULT_LABEL_RULE = "mean"


def rule_name(label: dict[str, Any]) -> str:
    """The label rule of a manifest's ``label`` entry (``"nucleus"``, the older name of ``"vote"``)."""
    rule = label.get("rule", "vote")
    return "vote" if rule == "nucleus" else rule


def default_min_layers(num_sparse_layers: int) -> int:
    """``max(1, round(0.5 * L))``: the ``"vote"`` rule's layer vote for ``L`` sparsely attended layers.

    With the always-resident sink and tail left out and a nucleus of 0.3 per layer, half the layers'
    vote marks 2.9% of the selectable chunks golden on SmolLM2-135M (30 layers, 16-token chunks), the
    2-3% the paper reports; a nucleus of 0.6 marks 12.8% (more than a 5% budget can hold, so golden
    recall there could not pass ~0.4), a vote of 3 layers 18%."""
    return max(1, round(0.5 * num_sparse_layers))


def golden_labels(
    mass: Tensor, top_p: float = DEFAULT_TOP_P, min_layers: int = 1, *, selectable: Tensor | None = None, rule: str = "vote"
) -> Tensor:
    """Golden chunks from attention masses: mass [Ls, N] -> bool [N].

    Only ``selectable`` chunks (bool [N]; all when ``None``) take part: the always-resident sink and
    tail are no selector's choice, and they hold most of the mass (on SmolLM2 the first chunk alone
    takes 40-80% in most layers), so a nucleus over all chunks would mark little besides them. Per
    layer, the masses over the selectable chunks are renormalised into shares. Then:

    - ``rule="mean"``: the shares are averaged over the layers, and the smallest set of chunks, taken by
      descending share (ties: lower chunk index first), whose share reaches ``top_p`` is golden
      (``min_layers`` is not used). A chunk that a third of the layers read heavily (the chunk an
      answer is copied from) is golden even when the other layers look elsewhere.
    - ``rule="vote"`` (the paper's form): each layer keeps its own nucleus of ``top_p``, and a chunk is
      golden when at least ``min_layers`` layers keep it. With a vote of half the layers, the chunk a
      retrieval answer is read from often misses the vote (SmolLM2, held-out tasks: the answer's chunk
      ranked first or second by the layer-averaged share in 10 of 12 but was golden in 4), so ``"mean"``
      is the default.

    A layer with no mass on any selectable chunk keeps none (and adds zero to the mean).

    Example::

        >>> golden_labels(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]), top_p=0.6, min_layers=1)
        tensor([ True,  True,  True])
        >>> golden_labels(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]), top_p=0.6, rule="mean")
        tensor([ True, False,  True])
        >>> golden_labels(torch.tensor([[0.5, 0.3, 0.2]]), top_p=0.6, selectable=torch.tensor([False, True, True]))
        tensor([False,  True, False])
    """
    if mass.dim() != 2:
        raise ValueError(f"mass must be [layers, chunks], got shape {list(mass.shape)}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_layers < 1:
        raise ValueError(f"min_layers must be >= 1, got {min_layers}")
    if rule not in LABEL_RULES:
        raise ValueError(f"rule must be one of {LABEL_RULES}, got {rule!r}")
    mass = mass.double().clamp_min(0)
    if selectable is not None:
        if selectable.shape != mass.shape[1:]:
            raise ValueError(f"selectable must be [chunks] = [{mass.shape[1]}], got shape {list(selectable.shape)}")
        mass = mass * selectable.to(mass.device, torch.bool)
    total = mass.sum(1, keepdim=True)
    share = torch.where(total > 0, mass / total.clamp_min(1e-300), torch.zeros_like(mass))
    if rule == "mean":
        share, min_layers = share.mean(0, keepdim=True), 1
        share = torch.where(share.sum(1, keepdim=True) > 0, share / share.sum(1, keepdim=True).clamp_min(1e-300), share)
    order = torch.sort(share, dim=1, descending=True, stable=True).indices
    ranked = share.gather(1, order)
    before = ranked.cumsum(1) - ranked  # mass of the chunks ranked ahead of each one
    keep_ranked = (before < top_p - 1e-9) & (ranked > 0)  # kept while the nucleus has not yet reached top_p
    keep = torch.zeros_like(keep_ranked).scatter(1, order, keep_ranked)
    return keep.sum(0) >= min_layers


def selectable_chunks(num_chunks: int, start: int, lsa_config: dict[str, Any]) -> Tensor:
    """bool [N]: the chunks written before ``start`` that a selector chooses among, i.e. all but the
    always-resident sink and tail of ``lsa_config`` (an ``LSAConfig`` dict or its ``_data``)."""
    data = lsa_config.get("_data", lsa_config)
    missing = [k for k in ("chunk_size", "sink_tokens", "recent_tokens") if k not in data]
    if missing:
        raise ValueError(f"the dump's lsa_config lacks {missing}: write it with LSAConfig.to_dict() (calibrate does)")
    keep = always_resident_chunks(
        start, chunk_size=int(data["chunk_size"]), sink_tokens=int(data["sink_tokens"]), recent_tokens=int(data["recent_tokens"])
    )
    mask = torch.ones(num_chunks, dtype=torch.bool)
    mask[[c for c in keep if c < num_chunks]] = False
    return mask


def label_rule(
    num_sparse_layers: int, *, top_p: float = DEFAULT_TOP_P, min_layers: int | None = None, rule: str = DEFAULT_LABEL_RULE
) -> dict[str, Any]:
    """The manifest's ``label`` entry: ``{"rule": "mean" | "vote", "top_p": p, "min_layers": k, "exclude": "always-resident"}``
    (``min_layers`` is the ``"vote"`` rule's; 1 under ``"mean"``)."""
    if rule not in LABEL_RULES:
        raise ValueError(f"rule must be one of {LABEL_RULES}, got {rule!r}")
    if rule == "mean":
        k = 1
    else:
        k = default_min_layers(num_sparse_layers) if min_layers is None else min_layers
    return {"rule": rule, "top_p": top_p, "min_layers": k, "exclude": "always-resident"}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__}
    for name, dist in (("lsa_rewrite", "lsa-rewrite"), ("transformers", "transformers")):
        try:
            out[name] = _metadata.version(dist)  # reads package metadata; does not import the package
        except _metadata.PackageNotFoundError:
            out[name] = None
    return out


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_manifest(directory: Path) -> dict[str, Any]:
    if not directory.exists():
        raise FileNotFoundError(f"no calibration dump at {directory} (no such directory)")
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {MANIFEST}: not a calibration dump")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is corrupt (not JSON): {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("_type") != DUMP_TYPE:
        found = manifest.get("_type") if isinstance(manifest, dict) else None
        raise ValueError(f"{path} is not a calibration dump manifest (_type={found!r}, expected {DUMP_TYPE!r})")
    if manifest.get("_version") != DUMP_VERSION:
        raise ValueError(
            f"{path}: calibration dump version {manifest.get('_version')!r} is not supported (this lsa-rewrite reads version {DUMP_VERSION})"
        )
    for key in (*STATIC_KEYS, "documents", "shards", "complete"):
        if key not in manifest:
            raise ValueError(f"{path} lacks the manifest entry {key!r}")
    return manifest


class DumpWriter:
    """Writes a calibration dump; resumes an interrupted one.

    ``manifest`` holds the static entries (``model``, ``lsa_config``, ``target_layers``, ``label``,
    ``shapes``; ``versions`` is filled in when absent). Documents are written whole: a shard is written
    (temp file, then rename, then the manifest) once the finished documents hold ``shard_windows``
    windows, so the manifest always lists exactly the documents whose windows are on disk. Opening a
    directory with an incomplete dump of the same static entries resumes it: ``finished`` holds the ids
    of the documents already in it, for the caller to skip.

    Example::

        >>> writer = DumpWriter("dump/", manifest)
        >>> for doc in documents:
        ...     if doc.id in writer.finished:
        ...         continue
        ...     index = writer.add_document(doc.id, source=doc.source, tokens=len(doc.ids), split=doc.split)
        ...     for t in starts:
        ...         writer.add_window({..., "meta": torch.tensor([index, t, t - 1])})
        >>> writer.close()  # manifest "complete": true
    """

    def __init__(self, out_dir: str | os.PathLike, manifest: dict[str, Any], *, shard_windows: int = 64) -> None:
        if not isinstance(shard_windows, int) or shard_windows < 1:
            raise ValueError(f"shard_windows must be an int >= 1, got {shard_windows!r}")
        missing = [key for key in STATIC_KEYS if key not in manifest]
        if missing:
            raise ValueError(f"the dump manifest needs the entries {missing} (see docs/indexer.md)")
        self.dir = Path(out_dir)
        self.shard_windows = shard_windows
        given = json.loads(json.dumps({key: manifest[key] for key in STATIC_KEYS}))
        if (self.dir / MANIFEST).exists():
            existing = _read_manifest(self.dir)
            for key in STATIC_KEYS:
                if existing[key] != given[key]:
                    raise ValueError(
                        f"{self.dir} holds a calibration dump with a different {key!r} ({existing[key]!r}, now {given[key]!r}); "
                        "write to another directory or delete it"
                    )
            self.manifest = existing
            for tmp in self.dir.glob(".*.tmp"):
                tmp.unlink()
        else:
            if self.dir.exists() and any(self.dir.glob("shard-*.safetensors")):
                raise ValueError(f"{self.dir} holds shard files but no {MANIFEST}: refusing to mix dumps; use an empty directory")
            self.dir.mkdir(parents=True, exist_ok=True)
            self.manifest = {
                "_type": DUMP_TYPE,
                "_version": DUMP_VERSION,
                **given,
                "versions": manifest.get("versions") or _versions(),
                "documents": [],
                "shards": [],
                "complete": False,
            }
            _write_json(self.dir / MANIFEST, self.manifest)
        self.finished: set[str] = {doc["id"] for doc in self.manifest["documents"]}
        shapes = self.manifest["shapes"]
        rope = shapes.get("rope", False)  # one bool, or one per target layer (a model mixing rotary and none)
        self._rope = any(rope) if isinstance(rope, list) else bool(rope)
        self._lt = len(self.manifest["target_layers"])
        sparse = self.manifest["model"].get("sparse_layers") if isinstance(self.manifest["model"], dict) else None
        self._ls = len(sparse) if sparse is not None else None
        self._pending_docs: list[dict[str, Any]] = []  # documents begun since the last shard
        self._pending: list[dict[str, Tensor]] = []  # their windows
        self._open = False  # a document is accepting windows
        self._closed = False

    @property
    def num_windows(self) -> int:
        """Windows on disk."""
        return sum(shard["windows"] for shard in self.manifest["shards"])

    def add_document(self, id: str, *, source: str, tokens: int, split: str, answer: int | None = None) -> int:
        """Begin a document (the previous one is finished); returns its index, the ``meta[0]`` of its windows.

        ``answer``: for a task, the token index where its reply starts (windows starting there or later
        are the reply's: ``CalibrationDump.at_reply``); ``None`` for running text.
        """
        self._check_writable()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if answer is not None and not (isinstance(answer, int) and 0 <= answer < int(tokens)):
            raise ValueError(f"answer must be a token index in [0, {int(tokens)}) of document {id!r}, got {answer!r}")
        id = str(id)
        if id in self.finished or any(doc["id"] == id for doc in self._pending_docs):
            raise ValueError(f"document {id!r} is already in the dump at {self.dir}")
        self._end_document()
        entry: dict[str, Any] = {"id": id, "source": str(source), "tokens": int(tokens), "split": split}
        if answer is not None:
            entry["answer"] = int(answer)
        self._pending_docs.append(entry)
        self._open = True
        self.manifest["complete"] = False
        return len(self.manifest["documents"]) + len(self._pending_docs) - 1

    def add_window(self, record: dict[str, Tensor]) -> None:
        """Add one window of the current document (fields of docs/indexer.md; ``query`` optional)."""
        self._check_writable()
        if not self._open:
            raise ValueError("add_window needs a current document: call add_document first")
        self._pending.append(self._validate(record))

    def flush(self) -> None:
        """Finish the current document and write every buffered document as a shard."""
        self._check_writable()
        self._open = False
        self._write_shard()

    def close(self) -> None:
        """Flush and mark the dump complete."""
        if self._closed:
            return
        self.flush()
        self.manifest["complete"] = True
        _write_json(self.dir / MANIFEST, self.manifest)
        self._closed = True

    def __enter__(self) -> "DumpWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._closed:
            raise ValueError(f"the dump writer for {self.dir} is closed")

    def _end_document(self) -> None:
        self._open = False
        if len(self._pending) >= self.shard_windows:
            self._write_shard()

    def _validate(self, record: dict[str, Tensor]) -> dict[str, Tensor]:
        fields = REQUIRED_FIELDS + (ROPE_FIELDS if self._rope else ())
        missing = [f for f in fields if f not in record]
        if missing:
            raise ValueError(f"window record lacks fields {missing}")
        allowed = set(fields) | set(OPTIONAL_FIELDS)
        unknown = sorted(set(record) - allowed)
        if unknown:
            raise ValueError(f"window record has unknown fields {unknown} (allowed: {sorted(allowed)})")
        out = {name: torch.as_tensor(value).detach().to("cpu").contiguous().clone() for name, value in record.items()}
        shapes, lt = self.manifest["shapes"], self._lt
        hkv, d = shapes.get("kv_heads"), shapes.get("head_dim")
        kmin = out["kmin"]
        if kmin.dim() != 4 or kmin.shape[0] != lt or out["kmax"].shape != kmin.shape:
            raise ValueError(f"kmin/kmax must be [Lt={lt}, N, Hkv, D], got {list(kmin.shape)} and {list(out['kmax'].shape)}")
        n = kmin.shape[1]
        if n < 1 or (hkv is not None and kmin.shape[2] != hkv) or (d is not None and kmin.shape[3] != d):
            raise ValueError(f"kmin/kmax shape {list(kmin.shape)} does not match the manifest (kv_heads={hkv}, head_dim={d}, N >= 1)")
        expect = {
            "hidden": (lt, shapes.get("hidden", out["hidden"].shape[-1])),
            "mass": (self._ls if self._ls is not None else out["mass"].shape[0], n),
            "golden": (n,),
            "meta": (3,),
        }
        if self._rope:
            dims = shapes.get("rotary_dims", d)  # partial rotary: the leading channels of each head only
            expect["cos"] = expect["sin"] = (out["cos"].shape[-1],) if dims is None else (dims,)
        if "query" in out:
            expect["query"] = (lt, shapes.get("q_heads", out["query"].shape[1]), out["query"].shape[-1] if d is None else d)
        for name, shape in expect.items():
            if tuple(out[name].shape) != tuple(shape):
                raise ValueError(f"window field {name!r} has shape {list(out[name].shape)}, expected {list(shape)}")
        if out["golden"].dtype != torch.bool:
            raise ValueError(f"window field 'golden' must be bool, got {out['golden'].dtype}")
        out["mass"] = out["mass"].float()
        out["meta"] = out["meta"].long()
        doc = int(out["meta"][0])
        current = len(self.manifest["documents"]) + len(self._pending_docs) - 1
        if doc != current:
            raise ValueError(f"window meta[0]={doc} is not the current document's index {current} (add_document returns it)")
        return out

    def _write_shard(self) -> None:
        if not self._pending_docs:
            return
        from safetensors.torch import save_file

        shards = self.manifest["shards"]
        first = self.num_windows
        ids = list(range(first, first + len(self._pending)))
        if ids:
            name = f"shard-{len(shards):05d}.safetensors"
            tensors = {f"{i}.{field}": value for i, record in zip(ids, self._pending) for field, value in record.items()}
            docs = sorted({int(record["meta"][0]) for record in self._pending})
            tmp = self.dir / f".{name}.tmp"
            save_file(tensors, str(tmp), metadata={"windows": json.dumps(ids), "documents": json.dumps(docs)})
            os.replace(tmp, self.dir / name)
            shards.append({"file": name, "windows": len(ids), "documents": docs})
        self.manifest["documents"].extend(self._pending_docs)
        self.finished.update(doc["id"] for doc in self._pending_docs)
        _write_json(self.dir / MANIFEST, self.manifest)
        self._pending_docs, self._pending = [], []


class CalibrationDump:
    """Reads a calibration dump.

    ``manifest`` (the JSON), ``documents``, ``target_layers``, ``shapes``, ``signature`` (the manifest's
    ``model``), ``lsa_config``, ``label``; ``len(dump)`` windows; ``windows(split=None)`` yields records
    (field name -> tensor, plus ``"split"``: the document's split and ``"window"``: the global id).
    An incomplete dump (an interrupted calibration) is refused unless ``allow_incomplete=True``.

    Example::

        >>> dump = CalibrationDump("dump/")
        >>> sum(1 for _ in dump.windows("heldout"))
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        if not self.manifest["complete"] and not allow_incomplete:
            raise ValueError(
                f"calibration dump {self.path} is incomplete ({len(self.manifest['documents'])} documents written): "
                "the calibration was interrupted; run it again with the same output directory to resume"
            )
        for shard in self.manifest["shards"]:
            if not (self.path / shard["file"]).is_file():
                raise FileNotFoundError(f"calibration dump {self.path} lists shard {shard['file']}, which is missing")

    @property
    def documents(self) -> list[dict[str, Any]]:
        return self.manifest["documents"]

    @property
    def target_layers(self) -> list[int]:
        return list(self.manifest["target_layers"])

    @property
    def shapes(self) -> dict[str, Any]:
        return self.manifest["shapes"]

    @property
    def signature(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def lsa_config(self) -> dict[str, Any]:
        return self.manifest["lsa_config"]

    @property
    def label(self) -> dict[str, Any]:
        return self.manifest["label"]

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def __len__(self) -> int:
        return sum(shard["windows"] for shard in self.manifest["shards"])

    def count(self, split: str | None = None) -> int:
        """Windows of documents in ``split`` (all when ``None``), from the shard lists (no tensor reads)."""
        if split is None:
            return len(self)
        total = 0
        for j in range(self.num_shards):
            total += sum(1 for record in self._shard_meta(j) if self.documents[record]["split"] == split)
        return total

    @property
    def has_replies(self) -> bool:
        """Whether the manifest records where any document's reply starts (dumps written since the field
        exists; older ones hold the same windows without saying which are a reply's)."""
        return any("answer" in doc for doc in self.documents)

    def at_reply(self, record: dict[str, Any]) -> bool:
        """Whether a window record starts at or after its document's reply (a task's answer being read)."""
        doc = self.documents[int(record["meta"][0])]
        return "answer" in doc and int(record["meta"][1]) >= int(doc["answer"])

    def count_replies(self, split: str | None = None) -> int:
        """Windows at a reply (``at_reply``) of documents in ``split`` (all when ``None``), from the shard lists."""
        if not self.has_replies:
            return 0
        total = 0
        for j in range(self.num_shards):
            for record in self._shard_windows(j):
                doc = self.documents[record[0]]
                total += (split is None or doc["split"] == split) and "answer" in doc and record[1] >= doc["answer"]
        return total

    def shard_nbytes(self) -> int:
        return sum((self.path / shard["file"]).stat().st_size for shard in self.manifest["shards"])

    def shard(self, j: int, *, split: str | None = None) -> list[dict[str, Any]]:
        """The records of shard ``j`` (in window order), those of ``split`` only when given."""
        from safetensors import safe_open

        entry = self.manifest["shards"][j]
        path = self.path / entry["file"]
        if split is not None and "documents" in entry and not any(self.documents[d]["split"] == split for d in entry["documents"]):
            return []
        try:
            with safe_open(str(path), framework="pt") as f:
                ids = json.loads((f.metadata() or {})["windows"])
                names = set(f.keys())
                records = []
                for i in ids:
                    fields = sorted(name.split(".", 1)[1] for name in names if name.split(".", 1)[0] == str(i))
                    record: dict[str, Any] = {field: f.get_tensor(f"{i}.{field}") for field in fields}
                    missing = [name for name in REQUIRED_FIELDS if name not in record]
                    if missing:
                        raise ValueError(f"window {i} lacks fields {missing}")
                    doc = self.documents[int(record["meta"][0])]
                    record["split"], record["window"] = doc["split"], i
                    if split is None or doc["split"] == split:
                        records.append(record)
        except FileNotFoundError:
            raise FileNotFoundError(f"calibration dump {self.path}: shard {entry['file']} is missing") from None
        except Exception as exc:
            raise ValueError(f"calibration dump {self.path}: shard {entry['file']} is corrupt: {exc}") from None
        return records

    def labels(
        self,
        record: dict[str, Any],
        *,
        top_p: float | None = None,
        min_layers: int | None = None,
        rule: str | None = None,
        rows: list[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(golden, selectable)`` bool [N] of a window record under the label rule with the always-resident
        chunks left out (``golden_labels``, ``selectable_chunks``); ``top_p`` / ``min_layers`` / ``rule``
        default to the manifest's. The recorded labels are used as they are when none is given and the
        dump's rule already leaves those chunks out; otherwise (another rule, or a dump written before the
        rule left them out) they are recomputed from the recorded masses. ``rows``: the label of those
        rows of ``mass`` only (positions in the model's sparse layers: one layer group), recomputed."""
        stored = self.label
        mass = record["mass"]
        selectable = selectable_chunks(mass.shape[1], int(record["meta"][1]), self.lsa_config)
        if rows is not None:
            if not rows or min(rows) < 0 or max(rows) >= mass.shape[0]:
                raise ValueError(f"rows must be positions among the dump's {mass.shape[0]} sparse layers, got {rows}")
            mass = mass[list(rows)]
        elif top_p is None and min_layers is None and rule is None and stored.get("exclude") == "always-resident":
            return record["golden"].bool() & selectable, selectable
        r = rule_name(stored) if rule is None else rule
        p = float(stored.get("top_p", DEFAULT_TOP_P)) if top_p is None else float(top_p)
        if min_layers is not None:
            k = int(min_layers)
        elif r == "vote":
            # the manifest's vote counts all sparse layers: a group's vote is half of its own layers
            k = int(stored.get("min_layers", 1)) if rule_name(stored) == "vote" and rows is None else default_min_layers(mass.shape[0])
        else:
            k = 1
        return golden_labels(mass, p, k, selectable=selectable, rule=r), selectable

    def windows(self, split: str | None = None) -> Iterator[dict[str, Any]]:
        """Every window record, shard by shard (only those of documents in ``split`` when given)."""
        for j in range(self.num_shards):
            yield from self.shard(j, split=split)

    def _shard_windows(self, j: int) -> list[tuple[int, int]]:
        """(document index, window start) of each window of shard ``j`` (reads only the ``meta`` tensors)."""
        from safetensors import safe_open

        with safe_open(str(self.path / self.manifest["shards"][j]["file"]), framework="pt") as f:
            ids = json.loads((f.metadata() or {})["windows"])
            return [tuple(int(v) for v in f.get_tensor(f"{i}.meta")[:2]) for i in ids]  # type: ignore[misc]

    def _shard_meta(self, j: int) -> list[int]:
        """Document index of each window of shard ``j`` (reads the shard's header only)."""
        from safetensors import safe_open

        entry = self.manifest["shards"][j]
        docs = entry.get("documents")
        if docs is not None and len({self.documents[d]["split"] for d in docs}) <= 1:
            return [docs[0]] * entry["windows"] if docs else []
        with safe_open(str(self.path / entry["file"]), framework="pt") as f:
            ids = json.loads((f.metadata() or {})["windows"])
            return [int(f.get_tensor(f"{i}.meta")[0]) for i in ids]

