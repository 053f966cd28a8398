"""`md4 info`, `md4 convert`, `md4 export`: describing a config or a model, importing the released
code's checkpoints, and writing a model as a directory to share."""

from __future__ import annotations

from md4 import inference, paths
from md4.config import Config
from md4.data import pipeline


def info(cfg: Config, config_name: str, model_dir: inference.ModelDir | None) -> None:
  """What cfg builds; with a model directory, that model (its recorded data, step and decoding)."""
  from md4 import export, info as info_lib
  from md4.standalone import Decoder
  spec = None if model_dir is None else inference.model_spec(model_dir, cfg)
  print(info_lib.render(info_lib.describe(cfg, spec), config_name))
  if model_dir is None:
    return
  kind = (f"exported by md4 export ({model_dir.params} parameters)" if model_dir.exported else
          "a workdir")
  print(f"model: {model_dir.path}, {kind}, step {model_dir.step}")
  if model_dir.origin:
    print(f"origin: {model_dir.origin}")
  if model_dir.description is None:
    print("recorded data: none (a checkpoint written before models recorded their data; readers "
          f"load the config's dataset, {cfg.data.dataset!r})")
  else:
    decoder = Decoder(model_dir.description, model_dir.path)
    print(f"recorded data: {model_dir.description.dataset}, "
          f"{export.describe_data(model_dir.description)}; decoding: "
          f"{decoder.describe_decoding()}")


def _decoding(cfg: Config, spec, tokenizer: str | None) -> tuple[dict, str]:
  """How a converted model's ids decode (md4.standalone's forms), and a note when no tokenizer is
  known: --tokenizer, else the prepared corpus's, else GPT-2's for a GPT-2-sized vocabulary."""
  from md4.data import documents, text8, tokenizers
  if tokenizer and spec.unit != "token":
    raise ValueError(f"--tokenizer applies to models of tokens; dataset {cfg.data.dataset!r} is "
                     f"{spec.kind} of {spec.unit}s")
  if spec.kind == "image":
    return {"pixels": spec.vocab_size}, ""
  if spec.unit == "char":
    return {"alphabet": text8.VOCAB}, ""
  if tokenizer:
    size = tokenizers.get_tokenizer(tokenizer).vocab_size
    if size != spec.vocab_size:
      raise ValueError(f"--tokenizer={tokenizer} has {size} tokens; the model reads "
                       f"{spec.vocab_size} (model.vocab_size={cfg.model.vocab_size} less "
                       f"model.extra_tokens={cfg.model.extra_tokens})")
    return {"tokenizer": tokenizer}, ""
  prepared = documents.prepared_tokenizer(cfg.data.data_dir, cfg.data.dataset)
  if prepared is not None:
    return {"tokenizer": prepared.name}, ""
  if spec.vocab_size == tokenizers.GPT2Tokenizer().vocab_size:
    return {"tokenizer": "gpt2"}, ""
  return {"ids": None}, (f"\n  no tokenizer of {spec.vocab_size} tokens is known: samples print "
                         "as ids; give --tokenizer=SPEC (sentencepiece:PATH or bpe:DIR) to record "
                         "the model's")


def convert(cfg: Config, workdir: str, step: int | None, tokenizer: str | None, *,
            reference: str | None, mdlm: str | None) -> None:
  """A checkpoint of the released code (reference) or of MDLM (mdlm) -> a checkpoint of this
  project, standing alone: it records the data's spec and decoding (`_decoding`)."""
  from md4 import standalone
  if reference and mdlm:
    raise ValueError("give --from_reference or --from_mdlm, not both")
  if not reference and not mdlm:
    raise ValueError("--from_reference=DIR (a checkpoint of the released code) or --from_mdlm=PATH "
                     "(an MDLM checkpoint) is required")
  if mdlm and step is not None:
    raise ValueError("--checkpoint_step does not apply to --from_mdlm: an MDLM checkpoint holds "
                     "one step")
  spec = pipeline.config_spec(cfg)
  decoding, note = _decoding(cfg, spec, tokenizer)
  # The tokenizer's files are copied into the workdir once the checkpoint is written.
  description = standalone.describe(cfg.data.dataset, spec, decoding, workdir, write=False)
  if mdlm:
    from md4 import convert_mdlm
    result = convert_mdlm.convert_checkpoint(mdlm, cfg, spec, workdir, description)
    what = f"MDLM {result.source}"
  else:
    from md4 import convert as convert_lib
    result = convert_lib.convert_checkpoint(reference, cfg, spec, workdir, step, description)
    what = result.source
  standalone.describe(cfg.data.dataset, spec, decoding, workdir)
  ema = ("params and EMA params" if result.has_ema else
         "params (no EMA weights in the source; EMA = params)")
  print(f"converted {what} (step {result.step}): {ema}, {result.num_params:,} parameters -> "
        f"{result.checkpoint_dir}{note}\n  md4 sample --workdir={workdir}   (the optimizer state "
        "starts fresh; the source's is not converted)")


def export(cfg: Config, model_dir: inference.ModelDir, to: str | None, which: str) -> None:
  """Writes the model in model_dir to the directory `to` (md4/export.py)."""
  from md4 import export as export_lib
  from md4 import metric_writer, standalone
  if not to:
    raise ValueError("--to=DIR is required: the directory to write the model to")
  if which not in export_lib.PARAMS:
    raise ValueError(f"--params={which!r} is invalid; valid: {', '.join(export_lib.PARAMS)}")
  loaded = inference.load(cfg, model_dir)
  description = model_dir.description
  if description is None:  # An older checkpoint: describe it from its dataset, loaded.
    description = standalone.describe_dataset(loaded.decoder, model_dir.path)
  metrics = [] if model_dir.exported else metric_writer.read_metrics(model_dir.path)
  source = export_lib.Source(model_dir.path, model_dir.step, cfg, description, model_dir.origin,
                             metrics)
  params = loaded.state.ema_params if which == "ema" else loaded.state.params
  written = export_lib.write(paths.resolve(to), source, params, which)
  print(f"exported step {model_dir.step} of {model_dir.path} ({which} parameters) -> {written}\n"
        f"  md4 sample --workdir={to}")
