"""The caption scrubber: report sentences with identifiers, dates and de-identification markers, and
ordinary clinical text that must come back byte for byte."""

from __future__ import annotations

import pytest

from synthmed.text.scrub import CATEGORIES, scrub, scrub_captions

# (sentence, scrubbed, changes per category)
SCRUBBED = [
    # de-identification markers, as the public datasets leave them
    ("Findings were discussed with Dr. ___ by ___ at 10:30 on ___ by telephone.",
     "Findings were discussed by telephone.", {"markers": 3, "dates": 1}),
    ("___-year-old male with chest pain.", "Male with chest pain.", {"markers": 1}),
    ("Comparison is made to the radiograph of ___ and the CT of ___.",
     "Comparison is made to the radiograph and the CT.", {"markers": 2}),
    ("Heart size normal. XXXX XXXX. Lungs clear.", "Heart size normal. Lungs clear.", {"markers": 2}),
    ("The XXXX are intact. No pneumothorax.", "The are intact. No pneumothorax.", {"markers": 1}),
    ("Followup [** 2101-10-12 **] with [**Last Name (NamePattern1) 1234**].", "Followup.", {"markers": 2}),
    ("Mr. [**Known lastname 123**] has a left pleural effusion.", "Has a left pleural effusion.", {"markers": 1}),
    ("Lungs clear [REDACTED] and <PHI>John</PHI> noted.", "Lungs clear and noted.", {"markers": 2}),
    ('Seen at <PHI TYPE="HOSPITAL">St Elsewhere</PHI>, no change.', "Seen, no change.", {"markers": 1}),
    ("Right lower lobe opacity. <DATE> follow-up recommended.",
     "Right lower lobe opacity. Follow-up recommended.", {"markers": 1}),
    ("PATIENT NAME: [Patient Name] ACCESSION: ___", "", {"markers": 2}),
    ("Report **NAME[AAA, BBB] **ID-NUM: mild cardiomegaly.", "Report: mild cardiomegaly.", {"markers": 2}),
    ("an ___-year-old woman with cough", "a woman with cough", {"markers": 1}),
    # dates and times
    ("Comparison is made to the prior study from 03/04/2021.", "Comparison is made to the prior study.",
     {"dates": 1}),
    ("Chest radiograph dated 2021-03-04 shows no acute process.", "Chest radiograph shows no acute process.",
     {"dates": 1}),
    ("On 4 March 2021, the patient underwent CT.", "The patient underwent CT.", {"dates": 1}),
    ("Exam performed Mar 4, 2021 at 9:15 pm.", "Exam performed.", {"dates": 2}),
    ("CT head 04-MAR-2021 without contrast", "CT head without contrast", {"dates": 1}),
    ("CT in March 2021 showed a stable nodule.", "CT showed a stable nodule.", {"dates": 1}),
    ("Unchanged since 2021-03-04T10:30:00Z.", "Unchanged.", {"dates": 1}),
    ("Study 20210304 of the chest", "Study of the chest", {"dates": 1}),
    ("As of 03.04.2021, stable.", "Stable.", {"dates": 1}),
    ("Portable chest x-ray at 09:15:22, T2/FLAIR hyperintensity",
     "Portable chest x-ray, T2/FLAIR hyperintensity", {"dates": 1}),
    ("At 1430 hours the line was repositioned.", "The line was repositioned.", {"dates": 1}),
    ("Prior exam on the 4th of March: no effusion.", "Prior exam: no effusion.", {"dates": 1}),
    ("CT 03.04.21 head", "CT head", {"dates": 1}),
    ("CT 03/2021 head", "CT head", {"dates": 1}),
    ("Seen at 9 am today.", "Seen today.", {"dates": 1}),
    # record, accession and other numbers
    ("MRN: 1234567. Frontal view of the chest.", "Frontal view of the chest.", {"ids": 1}),
    ("Acc# A12345 PA and lateral views of the chest.", "PA and lateral views of the chest.", {"ids": 1}),
    ("Portable AP chest (MRN 1234567) shows a left pleural effusion.",
     "Portable AP chest shows a left pleural effusion.", {"ids": 1}),
    ("Patient ID: AB-12345, axial CT of the abdomen", "Axial CT of the abdomen", {"ids": 1}),
    ("Chest x-ray for case #88213004, no focal consolidation",
     "Chest x-ray, no focal consolidation", {"ids": 1}),  # "case #" is the label
    ("SSN 123-45-6789 on file", "On file", {"ids": 1}),
    # phones, e-mail, URLs
    ("Contact jane.doe@example.org or (555) 123-4567 for questions.", "Contact for questions.",
     {"emails": 1, "phones": 1}),
    ("Call +44 20 7946 0958 with results.", "Call with results.", {"phones": 1}),
    ("Call 555-123-4567.", "Call.", {"phones": 1}),
    ("See www.example.org.", "See.", {"urls": 1}),
    ("Page the resident, pager 4-1234.", "Page the resident.", {"phones": 1}),
    ("Images at https://pacs.example.org/study/1.2.3?id=9, see report.", "Images, see report.", {"urls": 1}),
    # ages over 89: the age group stays, the age goes
    ("A 92-year-old woman with shortness of breath.", "A 90+-year-old woman with shortness of breath.",
     {"ages": 1}),
    ("The patient is 95 years old.", "The patient is 90+ years old.", {"ages": 1}),
    ("Patient aged 91, history of COPD.", "Patient aged 90+, history of COPD.", {"ages": 1}),
    ("97 y/o F, fall, left hip pain", "90+ y/o F, fall, left hip pain", {"ages": 1}),
    ("Male, 93 years of age.", "Male, 90+ years of age.", {"ages": 1}),
    # names after titles and labels
    ("Dr. John Smith reviewed the images.", "Reviewed the images.", {"names": 1}),
    ("Mrs. O'Brien-Smith has a 3 cm nodule.", "Has a 3 cm nodule.", {"names": 1}),
    ("Seen by Prof. J. K. Rowling, MD today.", "Seen today.", {"names": 1}),
    ("No acute process. Dictated by John Smith, MD on 03/04/2021 10:30.", "No acute process.",
     {"names": 1, "dates": 2}),
    ("Name: Jane Doe; DOB: 01/02/1930", "", {"names": 1, "dates": 1}),
    ("Radiologist: Jane Roe. No effusion.", "No effusion.", {"names": 1}),
    ("Seen <NAME>Jane</NAME> today", "Seen today", {"markers": 1}),
]

# Ordinary clinical text, captions and prompts: none of it may change.
UNCHANGED = [
    "T2-weighted axial MRI of the lumbar spine",
    "Disc protrusion at C5-C6 and L4/L5, L4-5 and C3-4",
    "3 cm mass in the right upper lobe on a 1.5 T scanner",
    "1.5T, 3.0 T and 7T MRI; HU 35; SUV 12.5",
    "Tumour grade 2, Gleason 3+4=7, pT2N0M0, BI-RADS 4",
    "Superior axial T1 slice",
    "axial slice 12",
    "Superior axial T1-weighted brain MRI slice at z = +69 mm; 51% grey matter, 30% white matter",
    "Lesion measures 2 x 3 x 4 cm; blood pressure 120/80 mmHg; 3/4 of the lung",
    "Contrast dilution 1:10, 10:1 compression ratio, pH 7.40",
    "TR 2000 ms, TE 2.5 ms, b = 1000 s/mm2, 12345 mm field of view, 0.123456 and 10,000 cells",
    "MS lesions in the periventricular white matter",
    "DR grading of a fundus photograph, grade 2",
    "ID consult recommended; May represent atelectasis.",
    "Compare with the prior from May.",
    "The patient is a 45-year-old man, aged 89 years",
    "Slice 3 of 12, series 4, x = +12 mm, y = -34 mm",
    "Generate an image containing a polyp in the upper-left, green box in the lower-left",
    "one polyp in the upper-left; two instruments; no polyp",
    "Chest X-ray shows right lower lobe consolidation",
    "Left hip X-ray, 2 views, PA and lateral",
    "Dr. visit pending",
]


@pytest.mark.parametrize(("text", "expected", "counts"), SCRUBBED)
def test_identifiers_dates_and_markers_are_removed(text, expected, counts):
    out, got = scrub(text)
    assert out == expected
    assert dict(got) == counts
    assert set(got) <= set(CATEGORIES)
    assert scrub(out) == (out, {})  # scrubbing is idempotent: a scrubbed caption has nothing left to find


@pytest.mark.parametrize("text", UNCHANGED)
def test_ordinary_clinical_text_is_left_alone(text):
    out, got = scrub(text)
    assert out == text and not got


def test_scrub_captions_counts_every_occurrence_and_keeps_the_order():
    captions = ["MRN: 1234567. Frontal chest", "Lateral chest", "MRN: 1234567. Frontal chest"]
    out, counts = scrub_captions(captions)
    assert out == ["Frontal chest", "Lateral chest", "Frontal chest"]
    assert counts == {"ids": 2}
    assert scrub_captions([]) == ([], {})
