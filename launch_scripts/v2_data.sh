# Sourced by build_aligned_start.sh and study_v2.sh (after `cd` to the repository root, with OUT
# set): the data of study v2 and of its start, made once under $OUT (tools/make_demo_data.py with
# the alignment sentences: same sizes and seed, same files), and spec NAME to read a shard spec
# of $OUT/data.json (train_shards, heldout_shards, typed_mix_shards, align_mix_shards,
# stage_mix_shards, asr_heldout_shards).
TRAIN_SAMPLES=${TRAIN_SAMPLES:-8000}
HELDOUT_SAMPLES=${HELDOUT_SAMPLES:-400}
SENTENCES=${SENTENCES:-6000}
HELDOUT_SENTENCES=${HELDOUT_SENTENCES:-400}
SAMPLES_PER_SHARD=${SAMPLES_PER_SHARD:-500}
PICTURE_ASR=${PICTURE_ASR:-0}  # transcriptions with a picture in stage_mix (the start's attempt 5 used 5000)
PICTURE_ASR_SOURCE=${PICTURE_ASR_SOURCE:-questions}  # their speech: the scene's question, or `sentences`
DESCRIBED_EXTRA=${DESCRIBED_EXTRA:-0}  # more spoken described-scene questions in stage_mix
DESCRIBED_EXTRA_TASKS=${DESCRIBED_EXTRA_TASKS:-colour,count}  # their kinds, in turn
PICTURED_DESCRIBED=${PICTURED_DESCRIBED:-0}  # spoken questions with picture + description (own shards)

# The settings the data is built with: an OUT built with others is refused, not silently reused.
DATA_SETTINGS="train=$TRAIN_SAMPLES heldout=$HELDOUT_SAMPLES sentences=$SENTENCES heldout_sentences=$HELDOUT_SENTENCES \
per_shard=$SAMPLES_PER_SHARD picture_asr=$PICTURE_ASR/$PICTURE_ASR_SOURCE described_extra=$DESCRIBED_EXTRA/$DESCRIBED_EXTRA_TASKS \
pictured_described=$PICTURED_DESCRIBED"
if [ -f "$OUT/data.json" ] && [ -f "$OUT/data_settings" ] && [ "$(cat "$OUT/data_settings")" != "$DATA_SETTINGS" ]; then
  echo "$OUT/data.json was built with other settings ($(cat "$OUT/data_settings")), not these ($DATA_SETTINGS):" \
       "use another OUT" >&2
  exit 1
fi
if [ ! -f "$OUT/data.json" ]; then
  mkdir -p "$OUT"
  python tools/make_demo_data.py --out "$OUT/data" --train "$TRAIN_SAMPLES" --heldout "$HELDOUT_SAMPLES" --seed 0 \
    --workers 2 --samples_per_shard "$SAMPLES_PER_SHARD" --sentences_train "$SENTENCES" \
    --sentences_heldout "$HELDOUT_SENTENCES" --picture_asr "$PICTURE_ASR" \
    --picture_asr_source "$PICTURE_ASR_SOURCE" --described_extra "$DESCRIBED_EXTRA" \
    --described_extra_tasks "$DESCRIBED_EXTRA_TASKS" --pictured_described "$PICTURED_DESCRIBED" > "$OUT/data.json.tmp"
  echo "$DATA_SETTINGS" > "$OUT/data_settings"
  mv "$OUT/data.json.tmp" "$OUT/data.json"
fi
spec() { python -c "import json, sys; print(json.load(open('$OUT/data.json'))[sys.argv[1]])" "$1"; }
