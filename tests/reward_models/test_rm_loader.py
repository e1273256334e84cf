"""load_reward / parse_spec: every spec form, and a clear error naming the spec for every mistake."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from reward_models import BUILTINS, RewardSet, RewardSpecError, load_reward, parse_spec
from reward_models.code_reward import CodeReward
from reward_models.countdown import CountdownReward
from reward_models.format_length import FormatReward, LengthReward
from reward_models.learned import LearnedReward
from reward_models.math_reward import MathReward
from reward_models.sudoku import SudokuReward

USER_FILE = '''
def exact(prompts, completions, answer, **kwargs):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def scaled(prompts, completions, factor=1.0, **kwargs):
    return [factor * len(c) for c in completions]

class Prefix:
    def __init__(self, prefix="ok"):
        self.prefix = prefix
    def __call__(self, prompts, completions, **kwargs):
        return [float(c.startswith(self.prefix)) for c in completions]
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return path


@pytest.mark.parametrize("name, cls, options", [
    ("math", MathReward, {"isolation": "inline"}), ("code", CodeReward, {}), ("sudoku", SudokuReward, {}),
    ("countdown", CountdownReward, {}), ("format", FormatReward, {}), ("length", LengthReward, {"target": 5}),
])
def test_builtin_names(name, cls, options):
    fn = load_reward(name, **options)
    assert isinstance(fn, cls) and fn.__name__ == name
    assert set(BUILTINS) == {"math", "code", "sudoku", "countdown", "format", "length"}


def test_builtin_options_reach_the_reward():
    fn = load_reward({"fn": "length", "kwargs": {"max_length": 4}})
    assert fn(None, ["abcdef"]) == [-0.5]  # 2 over a limit of 4


def test_module_path_function_and_class(tmp_path, monkeypatch):
    (tmp_path / "rm_test_pkg_x").mkdir()
    (tmp_path / "rm_test_pkg_x" / "__init__.py").write_text("")
    (tmp_path / "rm_test_pkg_x" / "mod.py").write_text(USER_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    exact = load_reward("rm_test_pkg_x.mod:exact")
    assert exact(["q", "q"], ["4", "5"], answer=["4", "4"]) == [1.0, 0.0]
    prefix = load_reward("rm_test_pkg_x.mod:Prefix", prefix="ab")  # a class is built with the options
    assert prefix(None, ["abc", "b"]) == [1.0, 0.0]
    fmt = load_reward("reward_models.format_length:FormatReward", tags=["answer"])
    assert fmt(None, ["<answer>1</answer>"]) == [1.0]


def test_file_path_absolute_relative_and_options(user_file, tmp_path):
    assert load_reward(f"{user_file}:exact")(None, ["7"], answer=["7"]) == [1.0]
    rel = load_reward("my_rewards.py:scaled", base_dir=str(tmp_path), factor=2.0)
    assert rel(None, ["abc"]) == [6.0]  # 2 * len("abc")


def test_two_files_with_the_same_name_do_not_clash(tmp_path):
    for sub, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "rewards.py").write_text(f"def r(prompts, completions, **kw):\n    return [{value}]\n")
    assert load_reward(f"{tmp_path}/a/rewards.py:r")(None, ["x"]) == [1.0]
    assert load_reward(f"{tmp_path}/b/rewards.py:r")(None, ["x"]) == [2.0]


def test_reward_model_directory(tiny_rm_dir):
    fn = load_reward(str(tiny_rm_dir), device="cpu")
    assert isinstance(fn, LearnedReward)
    scores = fn(["q"], ["a"])
    assert len(scores) == 1 and isinstance(scores[0], float)


def test_spec_name_renames_a_copy_not_the_users_function():
    def mine(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    fn = load_reward({"fn": mine, "name": "renamed"})
    assert fn.__name__ == "renamed" and mine.__name__ == "mine"


def test_recipe_dataclass_spec_is_read():
    from tracerl.config import RewardSpec as RecipeSpec

    spec = parse_spec(RecipeSpec(fn="", name="format", weight=0.5))
    assert (spec.fn, spec.name, spec.weight) == ("format", "format", 0.5)
    rs = RewardSet([RecipeSpec(fn="length", name="len", kwargs={"target": 4})])
    assert rs.names == ["len"] and rs(None, ["abcd"]).total.tolist() == [1.0]


@pytest.mark.parametrize("spec, named", [
    ("mathh", "mathh"),
    ("no_such_pkg_zz.mod:f", "no_such_pkg_zz.mod:f"),
    ("reward_models.math_reward:no_such_fn", "reward_models.math_reward:no_such_fn"),
    ("missing_file_zz.py:f", "missing_file_zz.py:f"),
    ("/no/such/rm_dir_zz", "/no/such/rm_dir_zz"),
    ({"fn": "math", "wieght": 2}, "wieght"),
    ({"weight": 2}, "needs 'fn'"),
    ({"fn": "math", "kwargs": [1]}, "'kwargs' must be a mapping"),
    (42, "42"),
    ("", "''"),
])
def test_bad_spec_names_the_spec(spec, named):
    with pytest.raises(RewardSpecError) as info:
        load_reward(spec)
    assert named in str(info.value)
    assert isinstance(info.value, ValueError)  # user mistakes are ValueErrors (the CLI's exit code 2)


def test_bad_option_names_the_reward_and_lists_accepted_options():
    with pytest.raises(RewardSpecError, match=r"reward 'countdown': bad option.*'target_column'"):
        load_reward("countdown", taget_column="t")
    with pytest.raises(RewardSpecError, match=r"reward 'length'.*exactly one of max_length"):
        load_reward("length")


def test_file_that_fails_to_import_names_the_spec(tmp_path):
    (tmp_path / "broken.py").write_text("def r(:\n")
    with pytest.raises(RewardSpecError, match=r"broken.py:r'.*SyntaxError"):
        load_reward(f"{tmp_path}/broken.py:r")


@pytest.mark.parametrize("body, error", [
    ("undefined_name\n", "NameError"),  # a module that exists but fails on import
    ("import argparse\nargparse.ArgumentParser().parse_args(['--bad'])\n", "SystemExit"),  # a script's argparse
])
def test_a_module_or_file_that_fails_on_import_names_the_spec(tmp_path, monkeypatch, body, error):
    (tmp_path / "rm_broken_mod_x.py").write_text(body + "def f(prompts, completions, **kw):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardSpecError, match=rf"reward 'rm_broken_mod_x:f': importing module 'rm_broken_mod_x' "
                                              rf"failed: {error}"):
        load_reward("rm_broken_mod_x:f")
    with pytest.raises(RewardSpecError, match=rf"rm_broken_mod_x.py:f'.*{error}"):
        load_reward(f"{tmp_path}/rm_broken_mod_x.py:f")


def test_a_reward_class_failing_in_its_init_names_the_spec(tmp_path):
    (tmp_path / "cls.py").write_text("class Judge:\n    def __init__(self):\n        raise RuntimeError('no key')\n")
    with pytest.raises(RewardSpecError, match=r"reward '.*cls.py:Judge': creating it raised RuntimeError: no key"):
        load_reward(f"{tmp_path}/cls.py:Judge")


def test_missing_attribute_in_file_lists_what_is_there(user_file):
    with pytest.raises(RewardSpecError, match=r"no 'exactt'.*'exact'"):
        load_reward(f"{user_file}:exactt")


def test_bad_weight_names_the_reward():
    with pytest.raises(RewardSpecError, match=r"reward 'format': weight must be a number, got 'heavy'"):
        RewardSet([{"fn": "format", "weight": "heavy"}])
    with pytest.raises(RewardSpecError, match="finite"):
        RewardSet([{"fn": "format", "weight": float("inf")}])


def test_rm_dir_with_two_labels_is_refused(tmp_path):
    from tests.reward_models.conftest import save_tiny_classifier

    path = save_tiny_classifier(tmp_path / "two", num_labels=2)
    with pytest.raises(RewardSpecError, match=r"2 labels, a reward model needs exactly 1"):
        load_reward(str(path))


def test_rewardset_from_spec_dicts_and_plain_callables(user_file):
    def bonus(completions, **kwargs):  # a TRL user's function
        return [0.5 for _ in completions]

    rs = RewardSet([{"fn": f"{user_file}:exact", "name": "exact", "weight": 2.0}, bonus,
                    {"fn": "format", "name": "fmt", "weight": 1.0, "kwargs": {"pattern": r"\d+"}}])
    assert rs.names == ["exact", "bonus", "fmt"] and rs.weights == [2.0, 1.0, 1.0]
    result = rs(["q", "q"], ["3", "x"], answer=["3", "3"])
    assert result.total.tolist() == [2 * 1 + 0.5 + 1, 2 * 0 + 0.5 + 0]  # [3.5, 0.5]


def test_duplicate_names_get_a_suffix():
    rs = RewardSet(["format", "format"])
    assert rs.names == ["format", "format_2"]


def test_dotted_attribute_in_a_file(tmp_path):
    """"file.py:Holder.r" walks attributes: a static method of a class in the file."""
    (tmp_path / "nested.py").write_text(textwrap.dedent("""
        class Holder:
            @staticmethod
            def r(prompts, completions, **kw):
                return [1.0] * len(completions)
    """))
    assert load_reward(f"{tmp_path}/nested.py:Holder.r")(None, ["a", "b"]) == [1.0, 1.0]


def test_the_docs_example_reward_file_and_recipe_lines_work(tmp_path):
    """docs/rewards.md, "Write your own reward": its reward file and YAML lines, run as a user would."""
    import re

    import yaml

    doc = (Path(__file__).resolve().parents[2] / "docs" / "rewards.md").read_text()
    section = doc.split("## Write your own reward", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[0]
    recipes = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)]
    (tmp_path / "my_rewards.py").write_text(code)
    completions = ["so... Answer: 42", "Answer: 41",
                   [{"role": "assistant", "content": "<think>a</think><answer>x</answer> Answer: 7"}]]
    answers = ["42", "42", None]
    simple, full = recipes
    assert simple["rewards"] == [{"fn": "my_rewards.py:my_reward", "name": "my_reward", "weight": 1.0}]
    assert simple["reward_on_error"] == "zero"
    one = RewardSet(simple["rewards"], on_error=simple["reward_on_error"], base_dir=str(tmp_path))
    total = one(None, completions, answer=answers).total.tolist()
    assert total[:2] == [1.0, 0.0] and total[2] != total[2]  # NaN: my_reward returns None, nothing else applies
    three = RewardSet(full["rewards"], on_error=full["reward_on_error"], base_dir=str(tmp_path))
    # my_reward [1, 0, None] * 1.0 + short answers [1, 1, 1] * 0.1 + format [0, 0, 1] * 0.2
    assert three(None, completions, answer=answers).total.tolist() == pytest.approx([1.1, 0.1, 0.3])
