"""Running a method on a live llama.cpp context: the statistics it needs, observed while the prompt
is decoded (compressor.Compressor), the repeat-the-context pass that scores importance
(reconstruction), and one sequence's compression from its first turn to its last
(sequence_compressor.SequenceCompressor)."""
