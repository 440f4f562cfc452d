"""Task registry and readers: every built-in task reads its shared sample (or a file in its public
release layout written here) into prefixed text-to-text examples, and bad input names the file/line."""
import pathlib

import pytest

from conftest import shared_file
from engine.tasks import Task, get_task, list_tasks, read_tsv, register_task, accuracy, label_postprocessor


def test_all_paper_tasks_are_registered():
    expected = {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wmt_en_de", "wmt_en_fr",
                "wmt_en_ro", "cnn_dailymail", "xsum", "squad"}
    assert expected <= set(list_tasks())
    with pytest.raises(ValueError, match="unknown task 'glue'"):
        get_task("glue")


@pytest.mark.parametrize("name,split,relative,count,inputs,targets", [
    ("sst2", "validation", "glue/sst2/dev.tsv", 872, "sst2 sentence: it 's a charming and often affecting journey .", "positive"),
    ("cola", "validation", "glue/cola/raw/in_domain_dev.tsv", 1043, "cola sentence: The sailors rode the breeze clear of the rocks.", "acceptable"),
    ("mrpc", "validation", "hf_fixtures/MRPC/dev.tsv", 6, "mrpc sentence1: He said the foodservice pie business doesn 't fit", "equivalent"),
    ("stsb", "validation", "hf_fixtures/STS-B/dev.tsv", 9, "stsb sentence1: A man with a hard hat is dancing. sentence2: A man wearing", "5.0"),
    ("wmt_en_de", "validation", "wmt_en_de/src-val.txt", 50, "translate English to German: Parliament Does Not Support", "Keine befreiende Novelle"),
    ("wmt_en_ro", "validation", "hf_fixtures/wmt_en_ro/val.json", 16, "translate English to Romanian: Brazil's Former", "Fostul șef"),
    ("cnn_dailymail", "train", "summarization/cnn_dailymail_3.0.0_train_sample100.csv", 100, "summarize: By . Associated Press .", "Bishop John Folda"),
    ("xsum", "train", "hf_fixtures/xsum/sample.json", 10, "summarize: The warning begins at 22:00 GMT", "The Met Office"),
    ("squad", "train", "hf_fixtures/SQUAD/sample.json", 14, "question: In what country is Normandy located? context: The Normans", "France"),
])
def test_shared_samples(name, split, relative, count, inputs, targets):
    shared_file(relative)
    data_dir = pathlib.Path(shared_file(relative)).parents[len(pathlib.Path(relative).parts) - 1]
    examples = list(get_task(name).examples(data_dir, split))  # found through the task's layouts
    assert len(examples) == count
    assert examples[0].inputs.startswith(inputs) and examples[0].targets.startswith(targets)
    assert examples[0].where.startswith(str(data_dir))


def test_squad_references_and_unanswerable():
    examples = list(get_task("squad").examples(shared_file("hf_fixtures/SQUAD/sample.json")))
    assert examples[1].reference[:2] == ["10th and 11th centuries", "in the 10th and 11th centuries"]
    assert examples[3].targets == "" and examples[3].reference == []


def test_wmt_en_de_drops_empty_pairs():
    n_lines = sum(1 for _ in open(shared_file("wmt_en_de/src-train.txt"), encoding="utf-8"))
    examples = list(get_task("wmt_en_de").examples(shared_file("wmt_en_de/src-train.txt")))
    assert len(examples) == n_lines - 1  # the sample has one empty source line


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_public_glue_layouts(tmp_path):
    _write(tmp_path / "MNLI/dev_matched.tsv",
           "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
           "0\t1\t1n\tgov\tThe cat sat.\tA cat is sitting.\tentailment\tentailment\n"
           "1\t2\t2c\tgov\tIt rained.\tIt was dry.\tcontradiction\tcontradiction\n")
    _write(tmp_path / "QQP/train.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                                       "5\t1\t2\tHow old is it?\tWhat is its age?\t1\n")
    _write(tmp_path / "QNLI/dev.tsv", "index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tnot_entailment\n")
    _write(tmp_path / "RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA b.\tB a.\tentailment\n")
    _write(tmp_path / "CoLA/train.tsv", "gj04\t0\t*\tThe more we study verbs.\n")
    mnli = list(get_task("mnli").examples(tmp_path, "validation_matched"))
    assert mnli[0].inputs == "mnli hypothesis: A cat is sitting. premise: The cat sat."
    assert [e.targets for e in mnli] == ["entailment", "contradiction"] and mnli[1].reference == 2
    qqp = next(get_task("qqp").examples(tmp_path, "train"))
    assert (qqp.inputs, qqp.targets) == ("qqp question1: How old is it? question2: What is its age?", "duplicate")
    qnli = next(get_task("qnli").examples(tmp_path, "validation"))
    assert (qnli.inputs, qnli.targets) == ("qnli question: Who? sentence: Him.", "not_entailment")
    rte = next(get_task("rte").examples(tmp_path, "train"))
    assert (rte.inputs, rte.targets) == ("rte sentence1: A b. sentence2: B a.", "entailment")
    cola = next(get_task("cola").examples(tmp_path, "train"))
    assert (cola.inputs, cola.targets, cola.reference) == ("cola sentence: The more we study verbs.", "unacceptable", 0)


def test_public_translation_layouts(tmp_path):
    _write(tmp_path / "newstest2014.en", "Hello world\nGood morning\n")
    _write(tmp_path / "newstest2014.fr", "Bonjour le monde\nBonjour\n")
    examples = list(get_task("wmt_en_fr").examples(tmp_path, "test"))
    assert [(e.inputs, e.targets) for e in examples] == [
        ("translate English to French: Hello world", "Bonjour le monde"),
        ("translate English to French: Good morning", "Bonjour")]
    _write(tmp_path / "newstest2014.fr", "Bonjour le monde\n")
    with pytest.raises(ValueError, match="not aligned"):
        list(get_task("wmt_en_fr").examples(tmp_path / "newstest2014.en"))


def test_official_squad_layout(tmp_path):
    _write(tmp_path / "dev-v1.1.json", '{"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": '
           '"Paris is in France.", "qas": [{"id": "q1", "question": "Where is Paris?", "answers": '
           '[{"text": "France", "answer_start": 12}, {"text": "in France", "answer_start": 9}]}]}]}]}')
    (example,) = get_task("squad").examples(tmp_path, "validation")
    assert example.inputs == "question: Where is Paris? context: Paris is in France."
    assert example.reference == ["France", "in France"]


def test_bad_input_names_file_and_line(tmp_path):
    bad = _write(tmp_path / "dev.tsv", "sentence\tlabel\ngood movie\t1\nbad movie\tmaybe\n")
    with pytest.raises(ValueError, match=r"dev.tsv:3: bad sst2 record .*'maybe'"):
        list(get_task("sst2").examples(bad))
    short = _write(tmp_path / "short.tsv", "sentence\tlabel\nno label column here\n")
    with pytest.raises(ValueError, match=r"short.tsv:2: expected at least 2"):
        list(get_task("sst2").examples(short))
    with pytest.raises(ValueError, match=r"x.tsv:1: the header has no column 'label': expected a header line with "
                       r"the columns sentence, label; found 2 tab-separated fields 'sentence\\tscore'"):
        list(read_tsv(_write(tmp_path / "x.tsv", "sentence\tscore\n a\t1\n"), required=("sentence", "label")))
    with pytest.raises(ValueError, match=r"x.tsv.csv:1: not a comma-separated \(CSV\) file: .*columns article, "
                       r"highlights; found 2 tab-separated fields"):
        list(get_task("cnn_dailymail").examples(_write(tmp_path / "x.tsv.csv", "sentence\tscore\n a\t1\n")))
    jsonl = _write(tmp_path / "raw.tsv", '{"sentence": "a", "label": 1}\n')
    with pytest.raises(ValueError, match=r"raw.tsv:1: expected at least 4 tab-separated columns \(source, label, "
                       r"original_mark, sentence\); found a JSON line '\{\"sentence\": \"a\""):
        list(get_task("cola").examples(jsonl))  # CoLA's raw release has no header line
    with pytest.raises(FileNotFoundError, match="no validation file under"):
        get_task("rte").resolve(_write(tmp_path / "empty/README", "").parent, "validation")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        get_task("rte").resolve(tmp_path, "dev")
    with pytest.raises(ValueError, match=r"broken.json:2: invalid JSON"):
        list(get_task("xsum").examples(_write(tmp_path / "broken.json", '{"document": "a", "summary": "b"}\n{oops\n')))


def test_user_task_in_a_few_lines(tmp_path):
    task = register_task(Task(
        name="test_boolq", reader=lambda p: read_tsv(p, required=("question", "label")),
        formatter=lambda r: (f"boolq question: {r['question']}", "true" if r["label"] == "1" else "false"),
        postprocessor=label_postprocessor(("false", "true")), reference=lambda r: int(r["label"]),
        metrics=(accuracy,)))
    examples = list(task.examples(_write(tmp_path / "b.tsv", "question\tlabel\nis it?\t1\nis not?\t0\n")))
    assert task.evaluate(examples, ["true", "nonsense"]) == {"accuracy": 50.0}
    with pytest.raises(ValueError, match="already registered"):
        register_task(task)
