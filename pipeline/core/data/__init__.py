"""Images in, index out: the folder scan and split, the index files, image decoding and transforms, the
offline default data set.
"""
