#!/usr/bin/env python
"""Train MemLlava in two stages that differ only by config:

    accelerate launch train.py --stage short                      # memory modules only, short clips
    accelerate launch train.py --stage long                       # + the LLM, longer videos, from the short output
    accelerate launch --config_file configs/accelerate/fsdp.yaml train.py --stage long --set training.max_steps=100

`--set key.sub=value` overrides any field of configs/stage_<stage>.yaml; the resolved config is saved as
memllava_train_config.yaml next to the model and inside every checkpoint. The logic lives in
modeling_memllava/training.py, where it is tested.
"""

import argparse
import logging
import os

import torch

from transformers import TrainingArguments, set_seed

from modeling_memllava.data import LlavaVideo178K
from modeling_memllava.training import (
    DataReportCallback,
    MemLlavaTrainer,
    StageConfigCallback,
    VideoSFTCollator,
    VideoSFTExamples,
    build_model_and_processor,
    configure_trainable,
    load_stage_config,
    save_stage_config,
)
from modeling_memllava.data import SkipCounter


logger = logging.getLogger("train")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["short", "long"], help="use configs/stage_<stage>.yaml")
    parser.add_argument("--config", help="a stage config YAML instead of --stage")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    args = parser.parse_args(argv)
    if bool(args.stage) == bool(args.config):
        parser.error("give exactly one of --stage and --config")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_stage_config(args.config or args.stage, args.set)
    training = dict(config["training"])
    if not torch.cuda.is_available() and "use_cpu" not in training:
        # No GPU: train on the CPU, over gloo when launched as several processes (`accelerate launch --multi_gpu`
        # sets the process-group environment; without use_cpu every process would train alone as rank 0).
        training["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            training["ddp_backend"] = training.get("ddp_backend") or "gloo"
    training_args = TrainingArguments(
        **training,
        remove_unused_columns=False,  # the video inputs are not in the LLM's signature
        ddp_find_unused_parameters=False,
    )
    set_seed(training_args.seed)

    model, processor = build_model_and_processor(config)
    counts = configure_trainable(model, train_llm=config["train_llm"])
    logger.info(
        "stage %s, rank %d of %d, trainable parameters: %s",
        config["stage"], training_args.process_index, training_args.world_size, counts,
    )  # fmt: skip
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == counts["memory"] + counts["llm"], (trainable, counts)
    assert (counts["llm"] > 0) == bool(config["train_llm"]), counts

    data = config["data"]
    counter = SkipCounter()
    reader = LlavaVideo178K(
        data["root"],
        subsets=data["subsets"],
        kinds=data["kinds"],
        revision=data.get("revision"),
        shuffle_buffer=data.get("shuffle_buffer", 0),
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        rank=training_args.process_index,
        world_size=training_args.world_size,
        counter=counter,
    )
    dataset = VideoSFTExamples(reader, processor, num_frames=data["num_frames"], max_length=data["max_length"], counter=counter)

    trainer = MemLlavaTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=VideoSFTCollator(pad_token_id=processor.tokenizer.pad_token_id),
        processing_class=processor,
        learning_rates=config["learning_rates"],
        skip_counter=counter,
        callbacks=[StageConfigCallback(config), DataReportCallback(counter, reader)],
    )
    if trainer.is_world_process_zero():
        save_stage_config(config, training_args.output_dir)
    resume = args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    trainer.save_model()  # model (with remote code) and processor, loadable with trust_remote_code=True


if __name__ == "__main__":
    main()
