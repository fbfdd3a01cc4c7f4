"""The dataset summary a user reads: summary.json (for the report stage), summary.md, summary.csv,
excluded.csv, duplicates.csv, and the contact-sheet and augmentation PNGs."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dataset.manifest import SPLITS
from dataset.sheets import augmentation_sheet, contact_sheet
from study.atomic import atomic_path, write_text_atomic
from study.cells import md_cell, neutralise_frame

DEDUP_POLICY = {
    "drop": ("one copy of each exact (sha256) or near (perceptual hash) duplicate group is kept: the first in "
             "source order, then sample_id; the others are dropped before splitting"),
    "same_split": ("every copy is kept, and each duplicate group is placed in a single split (splits swapped with "
                   "non-duplicates of the same class, so per-class split counts are unchanged)"),
}
MD_LIST_LIMIT = 60


def class_counts(manifest: pd.DataFrame, *, small_threshold: int) -> pd.DataFrame:
    """One row per class: label, split counts, per-source counts (n_<source>) and the small flag."""
    by_split = pd.crosstab(manifest["class_name"], manifest["split"]).reindex(columns=list(SPLITS), fill_value=0)
    by_source = pd.crosstab(manifest["class_name"], manifest["source"]).add_prefix("n_")
    labels = manifest.groupby("class_name")["label"].first()
    table = pd.concat([labels, by_split, by_source], axis=1).reset_index().rename(columns={"index": "class_name"})
    table["total"] = table[list(SPLITS)].sum(axis=1)
    table["sources"] = ["+".join(s[2:] for s in by_source.columns if row[s] > 0) for _, row in table.iterrows()]
    table["small"] = table["total"] < small_threshold
    cols = ["class_name", "label", "sources", *SPLITS, "total", *by_source.columns, "small"]
    return table.sort_values("label")[cols].reset_index(drop=True)


def _class_records(counts: pd.DataFrame) -> list[dict]:
    source_cols = [c for c in counts.columns if c.startswith("n_")]
    return [{"name": r["class_name"], "label": int(r["label"]),
             "sources": {c[2:]: int(r[c]) for c in source_cols if r[c] > 0},
             **{s: int(r[s]) for s in SPLITS}, "total": int(r["total"]), "small": bool(r["small"])}
            for _, r in counts.iterrows()]


def _source_records(*, resolved, table: pd.DataFrame, manifest: pd.DataFrame, duplicates: pd.DataFrame) -> list[dict]:
    dropped_source = duplicates["dropped"].str.split("/").str[0] if len(duplicates) else pd.Series(dtype=str)
    return [{"name": r.name, "kind": r.kind, "path": str(r.path), "downloaded": r.downloaded,
             "n_files": int((table["source"] == r.name).sum()),
             "n_excluded": int(((table["source"] == r.name) & (table["status"] != "ok")).sum()),
             "n_duplicates": int((dropped_source == r.name).sum()),
             "n_images": int((manifest["source"] == r.name).sum())} for r in resolved]


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        neutralise_frame(df).to_csv(tmp, index=False)  # opened in spreadsheets: no cell runs as a formula


def _md_table(df: pd.DataFrame) -> str:
    rows = [list(df.columns), ["---"] * len(df.columns), *df.astype(str).to_numpy().tolist()]
    return "\n".join("| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows)


def _markdown(summary: dict, counts: pd.DataFrame) -> str:
    lines = ["# Dataset summary", "",
             f"{sum(summary['split_counts'].values())} images in {summary['n_classes']} classes; splits "
             + ", ".join(f"{k} {v}" for k, v in summary["split_counts"].items())
             + f"; seed {summary['seed']}; manifest hash `{summary['manifest_hash'][:16]}`.", "",
             f"Protocol: `{json.dumps(summary['protocol'])}`", "", "## Sources", "",
             "| source | kind | files | excluded | duplicates | images in manifest |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['kind']} | {s['n_files']} | {s['n_excluded']} | {s['n_duplicates']} "
              f"| {s['n_images']} |" for s in summary["sources"]]
    small = [c["name"] for c in summary["classes"] if c["small"]]
    lines += ["", f"## Classes under {summary['small_class_threshold']} images ({len(small)})", "",
              ", ".join(small) or "none", "", "## Dropped classes", ""]
    lines += [f"- {d['name']}: {d['reason']}" for d in summary["dropped_classes"]] or ["none"]
    if summary["unused_mapping"]:
        lines += ["", "Config rename/drop keys that matched no class folder: " + ", ".join(summary["unused_mapping"])]
    lines += ["", f"## Excluded files ({len(summary['excluded'])})", ""]
    lines += [f"- `{e['path']}`: {e['reason']}" + (f" ({e['detail']})" if e["detail"] else "")
              for e in summary["excluded"][:MD_LIST_LIMIT]] or ["none"]
    dups = summary["duplicates"]
    lines += ["", f"## Duplicates ({sum(d['kind'] == 'exact' for d in dups)} exact, "
              f"{sum(d['kind'] == 'near' for d in dups)} near: 64-bit pHash distance <= {summary['near_distance']}"
              f" confirmed by 256-bit pHash distance <= {summary['confirm_distance']})", "",
              f"Policy: {summary['dedup_policy']}.", ""]
    lines += [f"- kept `{d['kept']}`, dropped `{d['dropped']}` ({d['kind']}, distance {d['distance']})"
              for d in dups[:MD_LIST_LIMIT]] or ["none"]
    if len(dups) > MD_LIST_LIMIT or len(summary["excluded"]) > MD_LIST_LIMIT:
        lines += ["", "(lists truncated here; all rows are in duplicates.csv and excluded.csv)"]
    lines += ["", "## Classes (counts by split and source)", "", _md_table(counts), "",
              f"![contact sheet]({summary['contact_sheet']})", "", f"![augmentations]({summary['augmentations']})", ""]
    return "\n".join(lines)


def write_summary(*, out_dir: Path, manifest: pd.DataFrame, manifest_hash: str, table: pd.DataFrame,
                  excluded: pd.DataFrame, duplicates: pd.DataFrame, usable: pd.DataFrame, dropped_classes: list[dict],
                  unused_mapping: list[str], resolved, data_cfg: dict, seed: int, data_root: Path) -> list[str]:
    """Write every summary artefact into ``out_dir``; return their file names."""
    counts = class_counts(manifest, small_threshold=data_cfg["small_class_threshold"])
    class_of = dict(zip(usable["sample_id"], usable["class_name"]))
    duplicates = duplicates.assign(kept_class=duplicates["kept"].map(class_of),
                                   dropped_class=duplicates["dropped"].map(class_of))
    excluded_table = excluded[["path", "source", "folder", "status", "detail"]].rename(columns={"status": "reason"})
    summary = {
        "sources": _source_records(resolved=resolved, table=table, manifest=manifest, duplicates=duplicates),
        "n_classes": int(manifest["label"].nunique()), "classes": _class_records(counts),
        "split_counts": {s: int((manifest["split"] == s).sum()) for s in SPLITS},
        "excluded": excluded_table.to_dict("records"), "duplicates": duplicates.to_dict("records"),
        "dedup_policy": DEDUP_POLICY[data_cfg["dedup"]["policy"]], "near_distance": data_cfg["dedup"]["near_distance"],
        "confirm_distance": data_cfg["dedup"]["confirm_distance"],
        "small_class_threshold": data_cfg["small_class_threshold"], "dropped_classes": dropped_classes,
        "unused_mapping": unused_mapping, "protocol": data_cfg["split"], "seed": seed, "manifest_hash": manifest_hash,
        "contact_sheet": "contact_sheet.png", "augmentations": "augmentations.png",
    }
    contact_sheet(manifest, data_root=data_root, path=out_dir / summary["contact_sheet"], seed=seed)
    augmentation_sheet(manifest, data_root=data_root, path=out_dir / summary["augmentations"], seed=seed)
    _write_csv(counts, out_dir / "summary.csv")
    _write_csv(excluded_table, out_dir / "excluded.csv")
    _write_csv(duplicates, out_dir / "duplicates.csv")
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=1, default=int))
    write_text_atomic(out_dir / "summary.md", _markdown(summary, counts))
    return ["summary.json", "summary.md", "summary.csv", "excluded.csv", "duplicates.csv",
            summary["contact_sheet"], summary["augmentations"]]
