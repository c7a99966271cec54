"""Feature streams for online action detection: LSTR / OadTR layouts (streams), SequenceExample shards (tfrecord)."""
