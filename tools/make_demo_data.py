"""Demo data: pictures of coloured shapes with questions whose answers can be read off the
drawing (datagen/demo.py says which), written as LLaVA JSON + images and, by default, as
spoken-question shards.

    python tools/make_demo_data.py --out demo_out/data --train 400 --heldout 100 --seed 0
    python tools/make_demo_data.py --out demo_out/data --no_shards     # JSON + images only
    python tools/make_demo_data.py --out align_out/data --train 8000 --heldout 400 \
        --sentences_train 6000 --sentences_heldout 400                  # + the alignment data

Writes DIR/train.json, DIR/heldout.json, DIR/images/*.png and, unless --no_shards,
DIR/shards/train/shard-*.tar and DIR/shards/heldout/shard-*.tar (built-in eSpeak NG TTS);
prints the paths and shard specs as JSON. Same seed -> same files.
With --sentences_train N (datagen/sentences.py), also the audio-text alignment data:
shards/align_mix (N spoken sentences over the demo's vocabulary to transcribe, N/2 spoken
questions on scenes described in words), shards/asr_heldout (--sentences_heldout spoken
sentences that never occur in align_mix: the transcription test) and shards/typed_mix (the
training VQA records, N typed-repeat records and N/2 typed described-scene questions: the typed
stage that teaches the LLM to say sentences and to answer from a description).
"""

import argparse
import json

from datagen.demo import make_demo_data
from datagen.sentences import DESCRIBED_TASKS, check_tasks, make_sentence_data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=400, help="training samples")
    parser.add_argument("--heldout", type=int, default=100, help="held-out (evaluation) samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_shards", action="store_true", help="write JSON + images only")
    parser.add_argument("--samples_per_shard", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1, help="TTS worker processes")
    parser.add_argument("--voices", default=None, help="comma-separated espeak voices (default: the TTS's own)")
    parser.add_argument("--sentences_train", type=int, default=0,
                        help="spoken alignment sentences (and as many typed-repeat ones); 0 = none")
    parser.add_argument("--sentences_heldout", type=int, default=0, help="held-out spoken sentences")
    parser.add_argument("--picture_asr", type=int, default=0,
                        help="with --sentences_train: training scenes whose picture + spoken question -> the "
                             "question's words join shards/stage_mix (transcription with a picture in the prompt)")
    parser.add_argument("--picture_asr_source", default="questions", choices=["questions", "sentences"],
                        help="what --picture_asr's speech says: the scene's own question, or a new training "
                             "sentence of datagen/sentences.py's grammar")
    parser.add_argument("--described_extra", type=int, default=0,
                        help="with --sentences_train: more spoken questions on described scenes, of "
                             "--described_extra_tasks in turn, join shards/stage_mix")
    parser.add_argument("--described_extra_tasks", default="colour,count",
                        help="comma-separated question kinds of --described_extra (colour, count, position, yesno, "
                             "choice)")
    parser.add_argument("--pictured_described", type=int, default=0,
                        help="with --sentences_train: spoken questions on training scenes with the picture and its "
                             "description in the prompt, on their own shards (shards/pictured_described)")
    args = parser.parse_args(argv)
    extra_tasks = tuple(task.strip() for task in args.described_extra_tasks.split(",") if task.strip())
    try:
        check_tasks(extra_tasks)  # before the demo data's TTS, not after it
    except ValueError:
        parser.error(f"--described_extra_tasks {args.described_extra_tasks!r}: each one of {', '.join(DESCRIBED_TASKS)}")
    if args.sentences_train and args.no_shards:
        parser.error("--sentences_train writes shards: drop --no_shards")
    paths = make_demo_data(args.out, num_train=args.train, num_heldout=args.heldout, seed=args.seed,
                           shards=not args.no_shards, samples_per_shard=args.samples_per_shard,
                           workers=args.workers, voices=args.voices.split(",") if args.voices else None)
    if args.sentences_train:
        paths.update(make_sentence_data(args.out, paths["train_json"], num_train=args.sentences_train,
                                        num_heldout=args.sentences_heldout, seed=args.seed,
                                        samples_per_shard=args.samples_per_shard, workers=args.workers,
                                        voices=args.voices.split(",") if args.voices else None,
                                        picture_asr=args.picture_asr,
                                        picture_asr_source=args.picture_asr_source,
                                        described_extra=args.described_extra,
                                        described_extra_tasks=extra_tasks,
                                        pictured_described=args.pictured_described))
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()
