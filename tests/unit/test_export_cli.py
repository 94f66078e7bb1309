"""What every export main() shares (export/cli.py): --model-repo with its env twin."""

from dataio import AMAZON
from export import cli


def test_model_repo_defaults_to_models_and_follows_its_env_twin(monkeypatch):
    monkeypatch.delenv("CROSSREC_MODEL_REPO", raising=False)
    args = cli.parser("x").parse_args([])
    assert args.model_repo == "models" and args.dataset == AMAZON
    monkeypatch.setenv("CROSSREC_MODEL_REPO", "/srv/models")
    assert cli.parser("x").parse_args([]).model_repo == "/srv/models"
    assert cli.parser("x").parse_args(["--model-repo", "elsewhere"]).model_repo == "elsewhere"


def test_the_encoder_parser_has_no_dataset_flag():
    assert not hasattr(cli.parser("x", dataset=False).parse_args([]), "dataset")
