"""The vocabulary the JupyterLab extension reads (`python -m mlsql.language.vocabulary OUT.json`,
run by `jlpm build`): every option of the OPTIONS table with all it declares, every ML function,
the statement words the parser knows, written stably; and the generator stays light.
(extensions/test/vocabulary.spec.ts checks that the extension's lists are this JSON's.)"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from mlsql.language import dialect, options
from mlsql.language import functions as lang_functions
from mlsql.language.vocabulary import TRANSFORM_FUNCTIONS, dumps, main, vocabulary

ROOT = Path(__file__).resolve().parents[1]


def _generated(tmp_path: Path) -> dict:
    out = tmp_path / "gen" / "vocabulary.json"
    r = subprocess.run([sys.executable, "-m", "mlsql.language.vocabulary", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text(encoding="utf-8"))


def test_every_option_of_every_statement_with_all_it_declares(tmp_path):
    voc = _generated(tmp_path)
    assert sorted(voc["options"]) == sorted(options.OPTIONS)  # every kind (keys sorted in the file)
    for kind, declared in options.OPTIONS.items():
        written = voc["options"][kind]
        assert [o["name"] for o in written] == [o.name for o in declared], kind  # all of them, in order
        for o, w in zip(declared, written, strict=True):
            for f in dataclasses.fields(o):
                if f.name == "check":
                    continue
                want = getattr(o, f.name)
                want = list(want) if isinstance(want, tuple) else want
                assert w[f.name] == want, f"{kind} {o.name}.{f.name}: {w[f.name]!r} != {want!r}"
            assert w["allowed"] == o.allowed()
            if o.type == "enum":
                assert w["choices"] and w["choices"] == list(o.choices)


def test_deploy_quantize_and_providers_are_the_tables(tmp_path):
    voc = _generated(tmp_path)
    deploy = {o["name"]: o for o in voc["options"]["DEPLOY MODEL"]}
    assert deploy["quantize"]["choices"] == list(options.QUANTIZE) == voc["values"]["quantize"]
    assert deploy["quantize"]["default"] == "none"
    assert "int8_static" in deploy["quantize"]["choices"]
    assert deploy["providers"]["values"] == list(options.PROVIDERS) == voc["values"]["providers"]
    assert deploy["providers"]["default"] == ["cpu"]
    for kind in ("EXPORT MODEL", "CREATE DEVICE"):  # every provider list names the providers
        assert {o["name"]: o for o in voc["options"][kind]}["providers"]["values"] == list(options.PROVIDERS)
    assert voc["values"]["model_type"] == list(options.MODEL_TYPES)
    assert voc["values"]["tree_format"] == list(options.TREE_FORMATS)


def test_every_ml_function_with_its_argument_shape(tmp_path):
    voc = _generated(tmp_path)
    functions = voc["functions"]
    assert set(functions) == set(lang_functions.ML_FUNCTIONS) | set(TRANSFORM_FUNCTIONS)
    for name in lang_functions.ML_FUNCTIONS:
        assert functions[name]["kind"] == "table"
        assert functions[name]["model"] is (name not in lang_functions.NO_MODEL_FUNCTIONS)
        assert functions[name]["settings"] == [o.name for o in options.OPTIONS.get(f"ML.{name}", ())]
    assert functions["PREDICT"]["settings"] == ["threshold", "device", "trial_id"]
    assert functions["DEVICE_METRICS"]["model"] is False
    for name in TRANSFORM_FUNCTIONS:
        assert functions[name] == {"kind": "transform", "model": False, "settings": []}


def test_the_functions_are_those_the_planner_fits_and_completion_describes():
    from mlsql.notebook import completion
    from mlsql.plan import transform

    assert set(transform._FITTERS) == set(TRANSFORM_FUNCTIONS)  # a fitter for each word, no more
    assert set(completion.ML_FUNCTIONS) == set(vocabulary()["functions"])


def test_keywords_are_the_parsers_words():
    kw = vocabulary()["keywords"]
    assert kw == sorted(set(kw))
    for w in ("MODEL", "MODELS", "DEPLOY", "DEVICE", "DEVICES", "JOB", "JOBS", "ROLLBACK", "TRANSFORM", "OPTIONS",
              "EXPORT", "NOTEBOOK", "GROUP", "TO", "ON", "AS", "PAUSE", "RESUME", "MLSQL", "RUN", "SHOW", "VERSION"):
        assert w in kw, w
    assert {w for head in dialect._ML_HEADS for w in head} <= set(kw)
    assert "ML" not in kw and vocabulary()["namespace"] == "ML"  # the functions' namespace, not a keyword
    assert all(w.isupper() and w.replace("_", "").isalpha() for w in kw)
    assert "E" not in kw  # a number's exponent the parser looks at is not a word


def test_written_stably_and_only_when_changed(tmp_path):
    out = tmp_path / "v.json"
    assert main([str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text == dumps() == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    os.utime(out, (1_000_000, 1_000_000))
    assert main([str(out)]) == 0
    assert out.stat().st_mtime == 1_000_000  # unchanged: not rewritten, so nothing rebuilds
    assert main([]) == 2


def test_the_generator_imports_only_the_language():
    code = ("import json, sys\n"
            "import mlsql.language.vocabulary as v; v.main(sys.argv[1:])\n"
            "mods = sorted(m for m in sys.modules if m == 'mlsql' or m.startswith('mlsql.'))\n"
            "heavy = sorted(m for m in ('duckdb', 'pyarrow', 'numpy', 'pandas', 'mlflow', 'torch', 'xgboost', 'pyspark',"
            " 'IPython', 'jupyterlab', 'device_bridge.providers') if m in sys.modules)\n"
            "print(json.dumps([mods, heavy]))")
    r = subprocess.run([sys.executable, "-c", code, os.devnull], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    mods, heavy = json.loads(r.stdout.splitlines()[-1])
    assert all(m in ("mlsql", "mlsql.errors") or m.startswith("mlsql.language") for m in mods), mods
    assert heavy == []  # (mlsql.errors brings device_bridge.errors, light on purpose)
