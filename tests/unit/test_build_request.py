"""One BuildRequest (atlas/records.py) for `atlas build`, sweep-file entries and POST /api/builds; its
option values are checked by the one validator, workers.options.validate, on every path."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from atlas.errors import BadInput
from atlas.records import NAMED_OPTIONS, BuildRequest
from cli.main import app

runner = CliRunner()


def test_one_request_type_for_every_door() -> None:
    from atlas.server import BuildRequest as served
    from cli.sweep import SweepFile

    assert served is BuildRequest
    assert SweepFile.model_fields["builds"].annotation == list[BuildRequest]
    fields = set(BuildRequest.model_fields)
    assert {"criterion", "verify", "options", *NAMED_OPTIONS} <= fields
    assert not fields & {"device", "executor", "address", "db"}  # where a build runs is not the user's request


def test_family_options_merge_the_named_fields_and_options() -> None:
    request = BuildRequest(models=["llama"], families="patterns, pursuit", concepts="colors, animals",
                           verify="off", corpus=["a.txt", "b.txt"], options={"n_random": 3, "seed": 2})
    assert request.families == ["patterns", "pursuit"]
    assert request.family_options() == {"n_random": 3, "seed": 2, "verify": "off", "corpus": ["a.txt", "b.txt"],
                                        "concepts": "colors,animals"}
    assert BuildRequest(models=["m"]).family_options() == {}  # nothing set, nothing passed: family defaults
    same = BuildRequest(models=["m"], seed=2, options={"seed": 2})
    assert same.family_options() == {"seed": 2}
    with pytest.raises(BadInput, match="option 'seed' is given twice"):
        BuildRequest(models=["m"], seed=1, options={"seed": 2}).family_options()


@pytest.mark.parametrize("fields", [
    {"models": []},
    {"models": "llama"},
    {"models": ["llama"], "unknown_option": 1},  # family options go in `options`
    {"models": ["llama"], "device": "cuda"},
    {"models": ["llama"], "seed": "zero"},
    {"models": ["llama"], "options": {f"o{i}": i for i in range(65)}},
])
def test_request_shapes_are_checked_by_the_model(fields: dict) -> None:
    with pytest.raises(ValidationError):
        BuildRequest.model_validate(fields)


@pytest.mark.parametrize(("args", "message"), [
    (["-o", "n_randon=3"], "no family in this build (pursuit) reads the option 'n_randon'"),
    (["-o", "verify=huge"], "option 'verify' = 'huge' is not one of small, standard, full, off"),
    (["--verify", "off", "-o", "verify=full"], "option 'verify' is given twice"),
    (["--seed", "1", "-o", "seed=2"], "option 'seed' is given twice"),
])
def test_cli_flags_and_options_go_through_the_one_validator(tmp_path, args: list[str], message: str) -> None:
    db = tmp_path / "a.duckdb"
    result = runner.invoke(app, ["build", "--model", "llama", "--families", "pursuit", "--db", str(db), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert not db.exists() and not list(tmp_path.iterdir())  # no atlas, no lock, no status, no shards
