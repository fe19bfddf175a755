"""Publishes a trained MAR run as the default model: analyses it and its --no-mar twin, copies files, writes the card.

Run: python -m marserve.train.publish --mar RUN_DIR --twin TWIN_DIR --command "marserve train ..."
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from marserve.default_model import MODEL_DIR

SHIPPED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
           "train_log.json")


def analyse_dir(model_dir: str, json_path: str, png_path: str) -> dict:
    from marserve.analysis.routing import run
    run(argparse.Namespace(model_dir=model_dir, prompts=None, routing_json=json_path, routing_png=png_path,
                           routing_seq_len=256, routing_max_tokens=8192))
    with open(json_path) as f:
        return json.load(f)


def main(argv=None) -> int:
    from marserve.train.model_card import comparison_table, write_card
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mar", required=True)
    p.add_argument("--twin", required=True)
    p.add_argument("--command", required=True, help="the marserve train command that produced --mar")
    p.add_argument("--reports", default="docs/mar_reports", help="where the JSON reports and heatmaps go")
    a = p.parse_args(argv)
    os.makedirs(a.reports, exist_ok=True)
    mar = analyse_dir(a.mar, f"{a.reports}/default_mar.json", f"{a.reports}/default_mar.png")
    twin = analyse_dir(a.twin, f"{a.reports}/default_twin.json", f"{a.reports}/default_twin.png")
    for name in SHIPPED:
        shutil.copyfile(os.path.join(a.mar, name), os.path.join(MODEL_DIR, name))
    with open(os.path.join(a.twin, "train_log.json")) as f:
        twin_log = json.load(f)
    twin_log.pop("log", None)
    with open(os.path.join(a.reports, "twin_train_summary.json"), "w") as f:
        json.dump(twin_log, f, indent=1)
    analysis_cmd = "python -m marserve.analysis.routing marserve/default_model --routing-json mar.json"
    twin_cmd = a.command.replace("runs/mar", "runs/twin") + " --no-mar"
    write_card(MODEL_DIR, mar, twin, twin_log, a.command, twin_cmd, analysis_cmd)
    print(comparison_table(mar, twin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
