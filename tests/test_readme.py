"""The README's quickstart runs as pasted, and CI runs the README's test command."""

import pathlib
import re
import runpy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tkfac_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quickstart_runs_and_trains(tmp_path, capsys):
  """The first Python block of the README runs unchanged, and its loss falls as it says."""
  script = tmp_path / "quickstart.py"
  script.write_text(_blocks("python")[0])
  runpy.run_path(str(script), run_name="__main__")
  losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", capsys.readouterr().out)]
  assert len(losses) == 5
  # The README says 2.55 -> 1.16; Adam (1e-3) in the same loop reaches 1.91.
  assert losses[-1] < 0.55 * losses[0]


def _quickstart(capsys):
  """The namespace of the README's quickstart, run as in a Python session: the blocks pasted
  after it run in the same one, so that its functions see their new bindings (runpy would hand
  back a copy of the script's globals)."""
  namespace = {"__name__": "__main__"}
  exec(compile(_blocks("python")[0], "README-quickstart", "exec"), namespace)  # pylint: disable=exec-used
  capsys.readouterr()
  return namespace


def _after_quickstart(marker, capsys):
  """Runs the README's quickstart, then, as if pasted after it, the Python block that contains
  ``marker``, unchanged, with warnings as errors (a layer that takes the fallback warns); returns
  the namespace and the losses the block printed."""
  namespace = _quickstart(capsys)
  block = next(b for b in _blocks("python") if marker in b)
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    exec(compile(block, f"README-{marker}", "exec"), namespace)  # pylint: disable=exec-used
  losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", capsys.readouterr().out)]
  return namespace, losses


def _assert_statistics_feed_every_layer(params, opt_state, expected):
  """Every layer of ``params`` with a kernel or an embedding (``expected`` of them) has factors in
  ``opt_state``, and those factors have taken statistics: none took the fallback silently."""
  paths = [[str(getattr(k, "key", getattr(k, "name", k))) for k in path]
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  owners = {"/".join(p[:i]) for p in paths for i, k in enumerate(p)
            if k in ("kernel", "embedding")}
  layers = tkfac_jax.diagnostics(opt_state)["layers"]
  assert len(owners) == expected and owners <= set(layers), (owners, sorted(layers))
  assert all(int(jnp.min(jnp.asarray(layers[o]["count"]))) > 0 for o in owners)


def test_transformer_example_continues_the_quickstart_and_trains(capsys):
  """The README's transformer block, pasted after the quickstart as it says, runs unchanged with
  warnings as errors (every kernel is preconditioned), and its loss falls as it says."""
  namespace, losses = _after_quickstart("MultiHeadDotProductAttention", capsys)
  assert len(losses) == 4
  # Every kernel and the embedding of the transformer have factors, fed by statistics.
  _assert_statistics_feed_every_layer(namespace["params"], namespace["opt_state"], 8)
  # The README says 6.04 -> 0.0008 at step 60.
  assert losses[-1] < 0.01 * losses[0]


def test_nnx_example_continues_the_quickstart_and_trains(capsys):
  """The README's NNX block, pasted after the quickstart as it says, runs unchanged with warnings
  as errors, and trains as it says."""
  nnx = pytest.importorskip("flax.nnx", exc_type=ImportError)
  if not hasattr(nnx, "iter_modules"):
    pytest.skip("tkfac_jax.nnx needs flax >= 0.12.2")
  namespace, losses = _after_quickstart("nnx.Optimizer", capsys)
  assert len(losses) == 5
  # Both of the Sequential's Linear layers have factors, fed by statistics.
  _assert_statistics_feed_every_layer(nnx.state(namespace["model"], nnx.Param),
                                      namespace["optimizer"].opt_state, 2)
  # The README says 2.52 -> 1.17; Adam (1e-3) in the same loop reaches 1.92.
  assert losses[-1] < 0.55 * losses[0]


def test_ci_runs_the_readme_test_command():
  """.ci/run runs exactly the command the README gives for the tests."""
  test_line = next(b for b in _blocks("bash") if "pytest" in b).strip()
  command = test_line.split("&&")[-1].strip()
  ci = (ROOT / ".ci" / "run").read_text()
  assert f'TEST_COMMAND="{command}"' in ci
  assert "$TEST_COMMAND" in ci


def test_sharded_example_continues_the_quickstart_on_eight_devices(capsys):
  """The README's data-parallel block, pasted after the quickstart as it says, runs unchanged on
  the 8 test devices, and its ten steps equal the same ten steps on one device."""
  namespace = _quickstart(capsys)
  # The reference: the quickstart's train_step continued on one device (copies: it donates).
  params, opt_state = jax.tree.map(jnp.copy, (namespace["params"], namespace["opt_state"]))
  for _ in range(10):
    params, opt_state, loss = namespace["train_step"](params, opt_state, namespace["x"],
                                                      namespace["y"])
  block = next(b for b in _blocks("python") if "NamedSharding" in b)
  exec(compile(block, "README-sharded", "exec"), namespace)  # pylint: disable=exec-used
  assert "on 8 device(s)" in capsys.readouterr().out
  assert len(namespace["x"].sharding.device_set) == 8
  np.testing.assert_allclose(float(namespace["loss"]), float(loss), rtol=1e-5)
  flat, ref = (jnp.concatenate([v.ravel() for v in jax.tree.leaves(t)])
               for t in (namespace["params"], params))
  assert float(jnp.linalg.norm(flat - ref)) <= 1e-5 * float(jnp.linalg.norm(ref))


def _github_anchor(heading):
  """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", ["README.md", "benchmarks/README.md"])
def test_local_links_resolve(document):
  """Every relative link in the READMEs names a file of the repository, and every #anchor one of
  its headings (a renamed section must not leave the verdict's links pointing nowhere)."""
  path = ROOT / document
  text = path.read_text()
  links = re.findall(r"\]\(([^)\s]+)\)", text)
  local = [link for link in links if not re.match(r"[a-z]+://", link)]
  assert local, "no relative links found: the pattern is wrong"
  for link in local:
    target, _, anchor = link.partition("#")
    target_path = (path.parent / target).resolve() if target else path
    assert target_path.exists(), f"{document}: link {link!r} names no file"
    if anchor:
      headings = re.findall(r"^#+ (.+)$", target_path.read_text(), flags=re.M)
      assert anchor in {_github_anchor(h) for h in headings}, (
          f"{document}: link {link!r} names no heading of {target_path.relative_to(ROOT)}")
