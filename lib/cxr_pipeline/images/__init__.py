"""Images in: the chest_xray tree layout, decoding (JPEG, PNG, DICOM), the patient-grouped splits."""
