"""`prepare`'s report.json: per-split counts built from the shard index records, merged across runs.

`build_report` turns the index records of a run's shards (`shard_jobs.write_shard`) and the skips found
while listing into report.json's content; `earlier_splits` recovers what an earlier run wrote for the
splits this run does not prepare, so that split-by-split runs add up instead of replacing each other.
"""

from __future__ import annotations

import json

from spectron_jax import filesystem
from spectron_jax.data import sources

INDEX_DIR = "shard_index"  # DIR/shard_index/<shard>.json: one record per finished shard
REPORT_EXAMPLES_PER_REASON = 20


def skip_dict(skip: sources.Skip) -> dict:
    return {"id": skip.id, "source": skip.source, "split": skip.split, "reason": skip.reason, "detail": skip.detail}


def summarise_skips(skips: list[dict]) -> dict:
    by_reason: dict[str, int] = {}
    examples: dict[str, list] = {}
    for skip in skips:
        by_reason[skip["reason"]] = by_reason.get(skip["reason"], 0) + 1
        kept = examples.setdefault(skip["reason"], [])
        if len(kept) < REPORT_EXAMPLES_PER_REASON:
            kept.append({k: skip[k] for k in ("id", "source", "detail")})
    return {"total": len(skips), "by_reason": dict(sorted(by_reason.items())), "examples": examples}


def _empty_split() -> dict:
    long = {"split": 0, "pieces": 0, "dropped": 0, "dropped_seconds": 0.0}
    return {"utterances": 0, "seconds": 0.0, "frames": 0, "shards": [], "dtypes": set(), "long": long}


def build_report(records: list[dict], listing_skips: list[sources.Skip], meta: dict) -> dict:
    """report.json: {format, input, features, splits: {split: {...}}, totals, [skipped_without_split]}.

    Each split: utterances (examples written), hours, frames, frame_dtype (storage: float16 /
    float32, a list when its shards differ), long_utterances {split: utterances longer than the window,
    pieces: examples written from them, dropped: stretches dropped as too long (also in skipped),
    dropped_hours}, skipped {total, by_reason, examples}, num_shards and shards [{file, examples, bytes}].
    """
    splits: dict[str, dict] = {}
    skips_by_split: dict[str | None, list[dict]] = {}
    for skip in listing_skips:
        skips_by_split.setdefault(skip.split, []).append(skip_dict(skip))
    for record in records:
        entry = splits.setdefault(record["split"], _empty_split())
        entry["dtypes"].add(record.get("frame_dtype", "float32"))  # records of format 1 stored float32
        for key, value in record.get("long_utterances", {}).items():
            entry["long"][key] += value
        entry["utterances"] += record["examples"]
        entry["seconds"] += record["seconds"]
        entry["frames"] += record["frames"]
        entry["shards"].append({"file": record["shard"], "examples": record["examples"], "bytes": record["bytes"]})
        skips_by_split.setdefault(record["split"], []).extend(record["skipped"])
    report_splits = {}
    for split in sorted(set(splits) | {s for s in skips_by_split if s is not None}):
        entry = splits.get(split, _empty_split())
        dtypes = sorted(entry["dtypes"])
        long = dict(entry["long"])
        long["dropped_hours"] = round(long.pop("dropped_seconds") / 3600, 6)
        report_splits[split] = {
            "utterances": entry["utterances"],
            "hours": round(entry["seconds"] / 3600, 6),
            "frames": entry["frames"],
            "frame_dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "long_utterances": long,
            "skipped": summarise_skips(skips_by_split.get(split, [])),
            "num_shards": len(entry["shards"]),
            "shards": sorted(entry["shards"], key=lambda s: s["file"]),
        }
    report = dict(meta)
    report["splits"] = report_splits
    if skips_by_split.get(None):
        report["skipped_without_split"] = summarise_skips(skips_by_split[None])
    report["totals"] = totals(report)
    return report


def totals(report: dict) -> dict:
    splits = report["splits"].values()
    return {
        "utterances": sum(s["utterances"] for s in splits),
        "hours": round(sum(s["hours"] for s in splits), 6),
        "skipped": sum(s["skipped"]["total"] for s in splits)
        + report.get("skipped_without_split", {}).get("total", 0),
    }


def earlier_splits(output_dir: str, feature_dict: dict, prepared: set[str]) -> tuple[dict, list[dict]]:
    """What report.json holds for splits this run does not prepare, if made with the same features.

    Returns:
      ({split: report entry}, [the index records of those splits' shards that are still complete]),
      so that a run of some splits (`--splits=validation`) keeps the others in report.json and
      stats.json instead of replacing them.
    """
    try:
        old = json.loads(filesystem.read_text(filesystem.join(output_dir, "report.json")))
    except (OSError, ValueError):
        return {}, []
    if not isinstance(old, dict) or old.get("features") != feature_dict:
        return {}, []
    kept, records = {}, []
    for split, entry in (old.get("splits") or {}).items():
        if split in prepared or not isinstance(entry, dict):
            continue
        kept[split] = entry
        for shard in entry.get("shards", []):
            try:
                index = filesystem.join(output_dir, INDEX_DIR, shard["file"] + ".json")
                record = json.loads(filesystem.read_text(index))
                if filesystem.size(filesystem.join(output_dir, shard["file"])) == record["bytes"]:
                    records.append(record)
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return kept, records
