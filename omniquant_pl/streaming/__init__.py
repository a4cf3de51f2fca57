"""Models larger than host memory (``model.streaming``): blocks read from the input shards one at a
time, finished blocks written to the output model's shards as they complete, and a block-by-block
evaluation. shards.py reads, load.py decides and loads the rest of the model, blocks.py keeps the
blocks on the meta device between uses, writer.py writes the output folder, evaluate.py evaluates."""
