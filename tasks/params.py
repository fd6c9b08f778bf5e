"""Parameter groups. Each stage takes its own group plus those of the stages it depends on, so
values given to TrainStudent flow down through ``clone`` and each artifact's fingerprint covers
exactly the settings that change it."""

import datetime

import luigi


class SnapshotDate:
    # Defined first, so it is the first positional parameter: RangeDaily passes the date there.
    date = luigi.DateParameter(default=datetime.date.today(), description="the snapshot date of a scheduled retrain")


class DataParams:
    dataset = luigi.Parameter(description="BEIR-style folder (its files may be gzip-compressed) or a .jsonl, .jsonl.gz or .parquet pairs file")
    output_dir = luigi.Parameter(default="runs/default", description="root of all artifacts of this run")
    device = luigi.Parameter(default="auto", significant=False, description="auto, cpu, cuda, cuda:N")
    seed = luigi.IntParameter(default=12)
    unlabeled_queries = luigi.Parameter(
        default="", description="queries nobody judged: JSONL ({_id, text}) or text, one per line (.txt); with --max-unjudged-queries, the teacher labels them"
    )
    trust_remote_code = luigi.BoolParameter(default=False, significant=False)
    # Set by RetrainStudent so that a failing stage records itself in the registry's history.
    registry = luigi.Parameter(default="", significant=False, description="model registry folder (scheduled retraining)")
    run_id = luigi.Parameter(default="", significant=False, description="name of this run in the registry")


class MineParams(DataParams):
    embedder = luigi.Parameter(default="sentence-transformers/all-MiniLM-L6-v2", description="bi-encoder for mining")
    num_negatives = luigi.IntParameter(default=7)
    range_min = luigi.IntParameter(default=0, description="skip this many top-ranked non-positives")
    range_max = luigi.IntParameter(default=50, description="consider non-positives ranked below this")
    sampling = luigi.ChoiceParameter(choices=["top", "random"], default="top")
    max_train_queries = luigi.IntParameter(default=0, description="0 = all training queries")
    max_unjudged_queries = luigi.IntParameter(
        default=0, description="queries no split judges that also train the student, labelled by the teacher alone; -1 = all"
    )
    rerank_top_k = luigi.IntParameter(default=20, description="candidates per dev/test query to rerank")
    absolute_margin = luigi.OptionalFloatParameter(default=None, description="drop candidates scored above positive - margin")
    relative_margin = luigi.OptionalFloatParameter(default=None, description="drop candidates above positive - |positive| * margin")
    max_score = luigi.OptionalFloatParameter(default=None, description="drop candidates the retriever scores above this")
    min_score = luigi.OptionalFloatParameter(default=None, description="drop candidates the retriever scores below this")
    negative_pool = luigi.IntParameter(
        default=0, description="mine this many negatives per query (labels use the first --num-negatives); 0 = --num-negatives"
    )
    random_negatives = luigi.FloatParameter(default=0.0, description="share of negatives drawn at random from the corpus")
    faiss_index = luigi.Parameter(default="Flat", description="faiss.index_factory string (Flat, IVF4096,Flat, HNSW32, IVF4096,PQ48)")
    faiss_nprobe = luigi.IntParameter(default=16, description="IVF lists searched per query")
    faiss_ef_search = luigi.IntParameter(default=128, description="HNSW search depth")
    max_length = luigi.IntParameter(
        default=256, description="max tokens per (query, passage) for student and embedder; 0: enough for 3 in 4 of the dataset's pairs (128 to 512)"
    )
    cache_dir = luigi.Parameter(default="", description="shared cache root; default <output-dir>/cache")
    query_prompt_name = luigi.Parameter(
        default="", description="embedder prompt for queries; default: its 'query' prompt if it has one, else its default prompt"
    )
    document_prompt_name = luigi.Parameter(
        default="", description="embedder prompt for passages; default: its 'document'/'passage'/'corpus' prompt, else its default"
    )
    max_positives = luigi.IntParameter(
        default=1, description="judged positives per training query that make training rows, the best graded first; 0 = all",
    )
    ignore_identical_ids = luigi.BoolParameter(
        default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="a passage whose id is the query's own is never its candidate or negative unless judged relevant (BEIR's rule)",
    )
    exclude_text_twins = luigi.BoolParameter(
        default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="a passage with the exact text of one of the query's positives is never its negative (sentence-transformers' rule)",
    )


class TeacherParams(MineParams):
    teacher = luigi.Parameter(
        default="",
        description="trained reranker(s), comma-separated; empty or 'fine-tuned' = fine-tune one from --teacher-backbone",
    )
    teacher_weights = luigi.Parameter(default="", description="ensemble weights, comma-separated")
    teacher_backbone = luigi.Parameter(default="", description="backbone the teacher is fine-tuned from")
    teacher_kind = luigi.ChoiceParameter(
        choices=["cross-encoder", "bi-encoder", "ensemble"], default="cross-encoder",
        description="kind of teacher to fine-tune; ensemble: a bi-encoder, then a cross-encoder started from it, mixed",
    )
    # Chosen on the demo's dev split (docs/student.md): a 6-layer cross-encoder started from the
    # fine-tuned bi-encoder reached nDCG@10 0.873 with MultipleNegativesRankingLoss at 1e-4 and
    # 0.801 with BinaryCrossEntropyLoss at 5e-5.
    teacher_loss = luigi.Parameter(default="MultipleNegativesRankingLoss", description="the cross-encoder teacher's loss (label-only)")
    teacher_head = luigi.ChoiceParameter(
        choices=["auto", "cosine", "mean", "cls"], default="auto", description="the cross-encoder teacher's head, as --student-head"
    )
    teacher_ensemble_weight = luigi.Parameter(
        default="dev",
        description="the cross-encoder's share of an ensemble teacher (z-normalised scores; the bi-encoder has the rest); "
        "dev: the share, in steps of 0.05, whose mix ranks the dev split's candidates best",
    )
    teacher_epochs = luigi.FloatParameter(default=1.0)
    teacher_learning_rate = luigi.FloatParameter(default=1e-4, description="the cross-encoder teacher's peak learning rate")
    teacher_batch_size = luigi.IntParameter(default=16, description="the cross-encoder teacher's batch size")
    teacher_bi_encoder_learning_rate = luigi.FloatParameter(default=5e-5, description="the bi-encoder teacher's peak learning rate")
    teacher_bi_encoder_batch_size = luigi.IntParameter(default=32, description="the bi-encoder teacher's batch size")
    teacher_negatives = luigi.IntParameter(default=3, description="mined negatives per query for teacher fine-tuning")
    teacher_max_length = luigi.IntParameter(default=512, description="max tokens per (query, passage) for the teacher; 0: as --max-length's 0")
    score_precision = luigi.Parameter(
        default="auto",
        description="auto (bf16 on CUDA and on CPUs with AMX or AVX512-BF16, else fp32), fp32, bf16, fp16 (CUDA), int8 (CPU)",
    )
    score_batch_tokens = luigi.IntParameter(
        default=0, significant=False, description="padded tokens per scoring batch; 0: 2048 on CPU, 16384 on CUDA"
    )
    score_shards = luigi.IntParameter(default=4, description="teacher scoring shards (separate, resumable tasks)")
    max_dev_queries = luigi.IntParameter(
        default=200, significant=False,
        description="dev queries of the checks logged on the way: the teacher's against the retriever (first scoring shard), the student's during training; 0: none",
    )


class LabelParams(TeacherParams):
    loss = luigi.Parameter(
        default="PackedMarginMSELoss", description="a loss of the table, or package.module:Class (default: MarginMSE, packed)"
    )
    label_scale = luigi.FloatParameter(default=1.0, description="multiplies teacher scores before building labels")
    false_negatives = luigi.ChoiceParameter(
        choices=["keep", "drop", "relabel"], default="keep",
        description="negatives the teacher scores within --false-negative-margin of the positive: keep, drop, or relabel as positives",
    )
    false_negative_margin = luigi.FloatParameter(default=0.0, description="in teacher-score units, before --label-scale")


class StudentParams(TeacherParams):
    """What the student is cut from, and to what depth."""

    student = luigi.Parameter(default="sentence-transformers/all-MiniLM-L6-v2", description="backbone the student is cut from")
    # Chosen on the demo's dev split (make bench-e2e; cosine head, lr 3e-4, one seed): nDCG@10 0.826 with
    # 2 layers, 0.861 with 3, 0.865 with 4. The fourth layer adds 0.004 for a third more compute per pair.
    student_layers = luigi.IntParameter(
        default=3, description="keep the backbone's first N layers (with --student-speedup: at most N, as measured)"
    )
    student_speedup = luigi.FloatParameter(
        default=0.0,
        description="the deepest student up to --student-layers whose pairs/s is at least this many times the teacher's, "
        "timed on dev candidates on this machine (ChooseStudentDepth); 0: --student-layers as given",
    )
    timing_queries = luigi.IntParameter(
        default=200, description="queries whose candidates every ranker is timed on, taking turns: test queries in the evaluation, "
        "dev queries for --student-speedup's depth (blocks of the same size, so both measure one ratio); 0 = every query",
    )
    # Dev nDCG@10 on the demo at each head's best rate of the same grid (make bench-e2e): 0.861 with the
    # cosine head against 0.350 for the [CLS] head a plain CrossEncoder gets from this backbone.
    student_head = luigi.ChoiceParameter(
        choices=["auto", "cosine", "mean", "cls"], default="auto",
        description="cosine of query and passage token means (cosine), linear on the token mean (mean) or on [CLS] (cls); "
        "auto: cosine for a sentence-embedding backbone, the backbone's own head for a cross-encoder",
    )


class TrainParams(LabelParams, StudentParams):
    loss_kwargs = luigi.Parameter(default="", description="JSON object of loss options")
    epochs = luigi.FloatParameter(default=1.0)
    batch_size = luigi.IntParameter(default=16)
    # Chosen on the demo's dev split (make bench-e2e; 3 layers, cosine head, one seed): nDCG@10 0.665 /
    # 0.845 / 0.861 / 0.841 at 2e-5 / 1e-4 / 3e-4 / 1e-3. A cut student learns little at fine-tuning rates.
    learning_rate = luigi.FloatParameter(default=3e-4, description="peak learning rate (linear warmup over 10%, then decay)")
    train_precision = luigi.Parameter(default="auto", description="auto (bf16 on CUDA and on CPUs with AMX or AVX512-BF16, else fp32), fp32, bf16, fp16")
    warm_start = luigi.Parameter(
        default="", description="a trained student folder to continue training instead of cutting one from --student "
        "(RetrainStudent passes the champion); needs --seen-data",
    )
    seen_data = luigi.Parameter(
        default="", description="with --warm-start: the prepared data folder (<run>/data/<fingerprint>) it was trained on; "
        "rows of queries not in it train, with --replay-ratio times as many rows of queries in it",
    )
    replay_ratio = luigi.FloatParameter(default=1.0, description="with --warm-start: replayed rows of seen queries per new row")
    # On the demo the plain student taught by the teacher ranked above the cosine-head student
    # (docs/student.md), and CrossEncoder(path) loads it with no flag.
    plain_student = luigi.BoolParameter(
        default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="publish the student in sentence-transformers' own modules (PlainStudent), started from the trained cosine-head "
        "student's encoder and taught by the teacher on the training queries' candidates: plain CrossEncoder(path) loads it; "
        "false: publish the cosine-head student",
    )
    plain_list_size = luigi.IntParameter(
        default=10, description="candidates of each training query's true top-k that PlainStudent's lists hold, drawn at random; "
        "0: all (twice the training time with the top 20; docs/student.md has both on the demo)",
    )
    plain_min_steps = luigi.IntParameter(
        default=800, description="PlainStudent trains at least this many steps: when its training queries are too few, it draws "
        "more lists of their candidates, those earlier lists left out first (with --plain-list-size 0: more epochs; docs/student.md)",
    )
    nproc_per_node = luigi.IntParameter(
        default=1, significant=False, description="GPUs to train on, one torchrun process each (DDP); 1 or no GPU = one process"
    )


class EvalParams(TrainParams):
    max_eval_queries = luigi.IntParameter(default=0, description="0 = every test query")
    fusion_dev_queries = luigi.IntParameter(
        default=1000,
        description="dev queries on which each student's weight in a fusion with the retriever's score is chosen; 0 = no fused rows",
    )
    label_only_loss = luigi.Parameter(
        default="", description="also train the same student on the judgments alone with this loss (e.g. BinaryCrossEntropyLoss) and compare"
    )
    # Chosen on the demo's dev split (make bench-partial, 2-layer students, seed 12): BCE nDCG@10 0.849 at
    # 1e-4 for 3 epochs, 0.719 at 1e-4 and 0.715 at 3e-4 for 1 epoch. It sees a quarter of the queries
    # the distilled student sees, so more passes over them pay.
    label_only_learning_rate = luigi.FloatParameter(default=1e-4, description="the label-only student's peak learning rate")
    label_only_epochs = luigi.FloatParameter(default=3.0, description="the label-only student's epochs")


class MultilingualParams(EvalParams):
    languages = luigi.Parameter(default="", description="target languages, comma-separated (corpus.<lang>.jsonl, queries.<lang>.jsonl)")
    source_language = luigi.Parameter(default="en", description="name of the language of corpus.jsonl / queries.jsonl")
    cross_lingual = luigi.BoolParameter(default=False, description="also train on query-in-one-language, passage-in-another rows")
    # Each language keeps only the negatives it has a translation of; a deeper pool leaves enough.
    negative_pool = luigi.IntParameter(default=16, description="negatives mined per query, for every language to choose from")
