"""Face data: identity folders and verification sets (identities), alignment (align), RecordIO and TFRecord packs."""
