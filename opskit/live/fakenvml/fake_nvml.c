/*
 * A fake libnvidia-ml.so.1 for tests: the real pynvml binding loads it and calls it exactly as it
 * would call NVIDIA's library, so opskit's whole NVML path (ctypes, error codes, structs) is exercised
 * on a machine without a GPU. Built against the nvml.h of the nvidia-nvml-dev wheel:
 *
 *     gcc -shared -fPIC -O2 -pthread -I<site-packages>/nvidia/cu13/include \
 *         -o libnvidia-ml.so.1 fake_nvml.c
 *
 * (opskit/live/fakenvml/__init__.py: build_fake_nvml(dest_dir) does this.)
 *
 * STATE FILE. The GPUs come from the text file named by $FAKE_NVML_STATE, re-read whenever it changes
 * (compared by inode, size and mtime), so a test can rewrite it between scrapes; write it atomically
 * (write a temp file, rename it over) — opskit.live.fakenvml.write_state(path, gpus) does. Format, one item
 * per line, fields separated by blanks, `#` starts a comment line:
 *
 *     driver 550.54.15          optional: what nvmlSystemGetDriverVersion returns (default 999.99)
 *     init 0                    optional: the code nvmlInitWithFlags returns (e.g. 9 = driver not loaded)
 *     <index> <uuid> <name> <util_pct> <mem_used_bytes> <mem_total_bytes> <temp_c> <power_mw> <lost>
 *         [<sm_clock_mhz> <mem_clock_mhz> <energy_mj> <pcie_replays> <ecc_unc_volatile> <ecc_unc_aggregate>
 *          <remapped_correctable> <remapped_uncorrectable> <remap_pending> <remap_failure>
 *          <clocks_event_reasons> <xids> [<mig_mode>]]
 *     mig <parent_index> <slot> <uuid> <name> <mem_used_bytes> <mem_total_bytes>
 *
 * The bracketed health fields are optional (missing ones read 0). <clocks_event_reasons> is NVML's
 * bitmask (0x4 power cap, 0x8 hw slowdown, 0x20/0x40 sw/hw thermal...), in decimal. <xids> lists the
 * XID codes the GPU has had, oldest first, comma-separated (`.` = none, `-` = events not supported):
 * an event set registered for XID events delivers, through nvmlEventSetWait_v2, each code appended
 * after it was registered (as the real driver delivers only new events).
 *
 * MIG. <mig_mode> is the GPU's current MIG mode (0 disabled, the default; 1 enabled; `-` a board without
 * MIG). A GPU with MIG enabled reports MAX_MIG MIG device slots (nvmlDeviceGetMaxMigDeviceCount) and no
 * utilization (NVML_ERROR_NOT_SUPPORTED, as NVIDIA's library on a MIG-enabled GPU); each `mig` line,
 * after its parent's line, puts a MIG device in slot <slot> (0..MAX_MIG-1) of GPU <parent_index>. A MIG
 * device handle answers nvmlDeviceGetUUID (<uuid>, MIG-...), nvmlDeviceGetName, nvmlDeviceGetMemoryInfo
 * and nvmlDeviceGetDeviceHandleFromMigDeviceHandle; every other reading is NOT_SUPPORTED on it. An
 * empty slot is NVML_ERROR_NOT_FOUND; a lost parent makes its MIG devices lost too.
 *
 * One GPU line per device, index 0, 1, 2, ... in order (a gap makes nvmlDeviceGetCount fail with
 * NVML_ERROR_UNKNOWN). <name> uses `_` for spaces (NVIDIA_H100_80GB_HBM3). <lost> 1 makes every call
 * on that GPU return NVML_ERROR_GPU_IS_LOST (15), as a GPU that fell off the bus does; the device
 * count still includes it, as real NVML's does. Any numeric field may instead be `-` (that query
 * returns NVML_ERROR_NOT_SUPPORTED, 3), `!` (NVML_ERROR_UNKNOWN, 999) or `!<code>` (that NVML code).
 * A missing or unreadable state file makes nvmlInitWithFlags return NVML_ERROR_DRIVER_NOT_LOADED.
 *
 * Example, 2 GPUs, GPU 1 at 95 % utilization with no power reading:
 *     driver 550.54.15
 *     0 GPU-00000000-0000-0000-0000-000000000000 NVIDIA_H100_80GB_HBM3 12 1073741824 85899345920 41 120000 0
 *     1 GPU-00000000-0000-0000-0000-000000000001 NVIDIA_H100_80GB_HBM3 95 1073741824 85899345920 67 - 0
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "nvml.h"

#define MAX_GPUS 64
#define STR_LEN 96
#define MAX_XIDS 64
#define MAX_MIG 7
#define MIG_SHIFT 16 /* a MIG device handle: parent handle | (slot + 1) << MIG_SHIFT */

enum {
    F_UTIL, F_MEM_USED, F_MEM_TOTAL, F_TEMP, F_POWER, F_LOST,
    F_SM_CLOCK, F_MEM_CLOCK, F_ENERGY, F_PCIE_REPLAYS, F_ECC_VOL, F_ECC_AGG,
    F_REMAP_CORR, F_REMAP_UNC, F_REMAP_PENDING, F_REMAP_FAILURE, F_EVENT_REASONS,
    NFIELDS
};

typedef struct {
    int present;
    char uuid[STR_LEN];
    char name[STR_LEN];
    unsigned long long mem_used, mem_total;
} fake_mig;

typedef struct {
    char uuid[STR_LEN];
    char name[STR_LEN];
    unsigned long long value[NFIELDS];
    nvmlReturn_t err[NFIELDS]; /* NVML_SUCCESS, or what querying that field returns */
    unsigned long long xids[MAX_XIDS];
    int nxids;
    int events_unsupported;
    unsigned long long mig_mode;
    nvmlReturn_t mig_err;
    fake_mig migs[MAX_MIG];
} fake_gpu;

/* An event set: which GPUs it listens to, and how many of each GPU's XIDs it has delivered. */
struct nvmlEventSet_st {
    int registered[MAX_GPUS];
    int delivered[MAX_GPUS];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int initialized;
static fake_gpu gpus[MAX_GPUS];
static int gpu_count;
static int state_ok;        /* the state file was read and is well formed */
static int state_bad_index; /* GPU lines out of order */
static nvmlReturn_t init_code;
static int sets_alive; /* event sets not yet freed (what a test may check after shutdown) */
static char driver[STR_LEN] = "999.99";
static struct stat last_stat;

static int same_file(const struct stat *a, const struct stat *b) {
    return a->st_ino == b->st_ino && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/* One numeric field: a number, `-` (not supported), `!` (unknown error) or `!<code>`. */
static void parse_field(const char *tok, unsigned long long *value, nvmlReturn_t *err) {
    *value = 0;
    *err = NVML_SUCCESS;
    if (strcmp(tok, "-") == 0) {
        *err = NVML_ERROR_NOT_SUPPORTED;
    } else if (tok[0] == '!') {
        *err = tok[1] ? (nvmlReturn_t)strtol(tok + 1, NULL, 10) : NVML_ERROR_UNKNOWN;
    } else {
        *value = strtoull(tok, NULL, 10);
    }
}

static void spaces(char *name) {
    for (char *p = name; *p; p++)
        if (*p == '_')
            *p = ' ';
}

/* `mig <parent_index> <slot> <uuid> <name> <mem_used> <mem_total>` */
static void parse_mig_line(char *line) {
    char uuid[STR_LEN], name[STR_LEN];
    int parent, slot;
    unsigned long long used, total;
    if (sscanf(line, " mig %d %d %95s %95s %llu %llu", &parent, &slot, uuid, name, &used, &total) != 6 ||
        parent < 0 || parent >= gpu_count || slot < 0 || slot >= MAX_MIG) {
        state_bad_index = 1;
        return;
    }
    fake_mig *m = &gpus[parent].migs[slot];
    m->present = 1;
    snprintf(m->uuid, STR_LEN, "%s", uuid);
    snprintf(m->name, STR_LEN, "%s", name);
    spaces(m->name);
    m->mem_used = used;
    m->mem_total = total;
}

static void parse_gpu_line(char *line) {
    char *save = NULL;
    char *tok = strtok_r(line, " \t\r\n", &save);
    if (gpu_count >= MAX_GPUS || tok == NULL)
        return;
    if (strtol(tok, NULL, 10) != gpu_count)
        state_bad_index = 1;
    fake_gpu *g = &gpus[gpu_count];
    memset(g, 0, sizeof(*g));
    char *uuid = strtok_r(NULL, " \t\r\n", &save);
    char *name = strtok_r(NULL, " \t\r\n", &save);
    snprintf(g->uuid, STR_LEN, "%s", uuid ? uuid : "GPU-missing");
    snprintf(g->name, STR_LEN, "%s", name ? name : "missing");
    spaces(g->name);
    for (int f = 0; f < NFIELDS; f++) {
        char *v = strtok_r(NULL, " \t\r\n", &save);
        parse_field(v ? v : "0", &g->value[f], &g->err[f]);
    }
    char *x = strtok_r(NULL, " \t\r\n", &save);
    if (x != NULL && strcmp(x, "-") == 0) {
        g->events_unsupported = 1;
    } else if (x != NULL && strcmp(x, ".") != 0) {
        char *xsave = NULL;
        for (char *code = strtok_r(x, ",", &xsave); code && g->nxids < MAX_XIDS; code = strtok_r(NULL, ",", &xsave))
            g->xids[g->nxids++] = strtoull(code, NULL, 10);
    }
    char *mig = strtok_r(NULL, " \t\r\n", &save);
    parse_field(mig ? mig : "0", &g->mig_mode, &g->mig_err);
    gpu_count++;
}

static void parse_state(FILE *fp) {
    char line[1024];
    gpu_count = 0;
    state_bad_index = 0;
    init_code = NVML_SUCCESS;
    snprintf(driver, STR_LEN, "999.99");
    while (fgets(line, sizeof(line), fp)) {
        char word[STR_LEN];
        if (sscanf(line, " %95s", word) != 1 || word[0] == '#')
            continue;
        if (strcmp(word, "driver") == 0) {
            sscanf(line, " driver %95s", driver);
        } else if (strcmp(word, "init") == 0) {
            int code = 0;
            sscanf(line, " init %d", &code);
            init_code = (nvmlReturn_t)code;
        } else if (strcmp(word, "mig") == 0) {
            parse_mig_line(line);
        } else {
            parse_gpu_line(line);
        }
    }
}

/* Re-read the state file if it changed. Called with the lock held. */
static void refresh(void) {
    const char *path = getenv("FAKE_NVML_STATE");
    struct stat st;
    if (path == NULL || stat(path, &st) != 0) {
        state_ok = 0;
        memset(&last_stat, 0, sizeof(last_stat));
        return;
    }
    if (state_ok && same_file(&st, &last_stat))
        return;
    FILE *fp = fopen(path, "r");
    if (fp == NULL) {
        state_ok = 0;
        return;
    }
    parse_state(fp);
    fclose(fp);
    last_stat = st;
    state_ok = 1;
}

/* Lock, refresh, and resolve a handle to its GPU (for a MIG device handle: its parent, and *mig to
 * the MIG device, else NULL); returns NVML_SUCCESS and sets *out, or an error. */
static nvmlReturn_t enter_any(nvmlDevice_t device, fake_gpu **out, fake_mig **mig) {
    pthread_mutex_lock(&lock);
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    refresh();
    uintptr_t i = (uintptr_t)device & ((1u << MIG_SHIFT) - 1), slot = (uintptr_t)device >> MIG_SHIFT;
    if (i == 0 || (int)i > gpu_count || slot > MAX_MIG)
        return NVML_ERROR_INVALID_ARGUMENT;
    *out = &gpus[i - 1];
    *mig = NULL;
    if ((*out)->value[F_LOST])
        return NVML_ERROR_GPU_IS_LOST;
    if (slot) {
        *mig = &(*out)->migs[slot - 1];
        if ((*out)->mig_err != NVML_SUCCESS || !(*out)->mig_mode || !(*mig)->present)
            return NVML_ERROR_INVALID_ARGUMENT; /* a MIG device that no longer exists */
    }
    return NVML_SUCCESS;
}

/* enter_any for the calls a MIG device handle does not support. */
static nvmlReturn_t enter_device(nvmlDevice_t device, fake_gpu **out) {
    fake_mig *mig;
    nvmlReturn_t ret = enter_any(device, out, &mig);
    return ret == NVML_SUCCESS && mig ? NVML_ERROR_NOT_SUPPORTED : ret;
}

static nvmlReturn_t leave(nvmlReturn_t ret) {
    pthread_mutex_unlock(&lock);
    return ret;
}

static nvmlReturn_t copy_str(char *dst, unsigned int length, const char *src) {
    if (dst == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&lock);
    refresh();
    if (!state_ok)
        return leave(NVML_ERROR_DRIVER_NOT_LOADED);
    if (init_code != NVML_SUCCESS)
        return leave(init_code);
    initialized++;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    if (!initialized)
        return leave(NVML_ERROR_UNINITIALIZED);
    initialized--;
    return leave(NVML_SUCCESS);
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    pthread_mutex_lock(&lock);
    if (!initialized)
        return leave(NVML_ERROR_UNINITIALIZED);
    refresh();
    return leave(copy_str(version, length, driver));
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount) {
    pthread_mutex_lock(&lock);
    if (!initialized)
        return leave(NVML_ERROR_UNINITIALIZED);
    if (deviceCount == NULL)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    refresh();
    if (!state_ok)
        return leave(NVML_ERROR_DRIVER_NOT_LOADED);
    if (state_bad_index)
        return leave(NVML_ERROR_UNKNOWN);
    *deviceCount = (unsigned int)gpu_count;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    fake_gpu *g;
    if (device == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    /* A handle is the 1-based index; 0 would look like NULL to callers. */
    nvmlReturn_t ret = enter_device((nvmlDevice_t)(uintptr_t)(index + 1), &g);
    if (ret == NVML_SUCCESS)
        *device = (nvmlDevice_t)(uintptr_t)(index + 1);
    return leave(ret);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    fake_gpu *g;
    fake_mig *m;
    nvmlReturn_t ret = enter_any(device, &g, &m);
    return leave(ret != NVML_SUCCESS ? ret : copy_str(uuid, length, m ? m->uuid : g->uuid));
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    fake_gpu *g;
    fake_mig *m;
    nvmlReturn_t ret = enter_any(device, &g, &m);
    return leave(ret != NVML_SUCCESS ? ret : copy_str(name, length, m ? m->name : g->name));
}

/* Fetch one numeric field of a device, or the error the state file asks for. */
static nvmlReturn_t get_field(nvmlDevice_t device, int field, unsigned long long *value) {
    fake_gpu *g;
    nvmlReturn_t ret = enter_device(device, &g);
    if (ret == NVML_SUCCESS) {
        ret = g->err[field];
        *value = g->value[field];
    }
    return leave(ret);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    fake_gpu *g;
    if (utilization == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = enter_device(device, &g);
    if (ret == NVML_SUCCESS)
        ret = g->mig_err == NVML_SUCCESS && g->mig_mode ? NVML_ERROR_NOT_SUPPORTED : g->err[F_UTIL];
    if (ret == NVML_SUCCESS) {
        utilization->gpu = (unsigned int)g->value[F_UTIL];
        utilization->memory = (unsigned int)(g->value[F_UTIL] / 2);
    }
    return leave(ret);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    unsigned long long used, total;
    fake_gpu *g;
    fake_mig *m;
    if (memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = enter_any(device, &g, &m);
    if (ret != NVML_SUCCESS || m) {
        if (m) {
            memory->used = m->mem_used;
            memory->total = m->mem_total;
            memory->free = m->mem_total > m->mem_used ? m->mem_total - m->mem_used : 0;
        }
        return leave(ret);
    }
    leave(ret);
    ret = get_field(device, F_MEM_USED, &used);
    if (ret == NVML_SUCCESS)
        ret = get_field(device, F_MEM_TOTAL, &total);
    if (ret == NVML_SUCCESS) {
        memory->used = used;
        memory->total = total;
        memory->free = total > used ? total - used : 0;
    }
    return ret;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensorType,
                                      unsigned int *temp) {
    unsigned long long v;
    if (temp == NULL || sensorType != NVML_TEMPERATURE_GPU)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = get_field(device, F_TEMP, &v);
    if (ret == NVML_SUCCESS)
        *temp = (unsigned int)v;
    return ret;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    unsigned long long v;
    if (power == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = get_field(device, F_POWER, &v);
    if (ret == NVML_SUCCESS)
        *power = (unsigned int)v;
    return ret;
}

/* ---- GPU health readings ----------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, nvmlClockType_t type, unsigned int *clock) {
    unsigned long long v;
    if (clock == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    int field = type == NVML_CLOCK_MEM ? F_MEM_CLOCK : type == NVML_CLOCK_SM || type == NVML_CLOCK_GRAPHICS
                                                           ? F_SM_CLOCK : -1;
    if (field < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    nvmlReturn_t ret = get_field(device, field, &v);
    if (ret == NVML_SUCCESS)
        *clock = (unsigned int)v;
    return ret;
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy) {
    if (energy == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    return get_field(device, F_ENERGY, energy);
}

nvmlReturn_t nvmlDeviceGetPcieReplayCounter(nvmlDevice_t device, unsigned int *value) {
    unsigned long long v;
    if (value == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = get_field(device, F_PCIE_REPLAYS, &v);
    if (ret == NVML_SUCCESS)
        *value = (unsigned int)v;
    return ret;
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, nvmlMemoryErrorType_t errorType,
                                         nvmlEccCounterType_t counterType, unsigned long long *eccCounts) {
    if (eccCounts == NULL || counterType > NVML_AGGREGATE_ECC)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = get_field(device, counterType == NVML_VOLATILE_ECC ? F_ECC_VOL : F_ECC_AGG, eccCounts);
    if (ret == NVML_SUCCESS && errorType != NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
        *eccCounts = 0; /* the fake's boards never see a corrected error */
    return ret;
}

nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *corrRows, unsigned int *uncRows,
                                       unsigned int *isPending, unsigned int *failureOccurred) {
    fake_gpu *g;
    if (corrRows == NULL || uncRows == NULL || isPending == NULL || failureOccurred == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = enter_device(device, &g);
    if (ret == NVML_SUCCESS && (ret = g->err[F_REMAP_CORR]) == NVML_SUCCESS) {
        *corrRows = (unsigned int)g->value[F_REMAP_CORR];
        *uncRows = (unsigned int)g->value[F_REMAP_UNC];
        *isPending = (unsigned int)g->value[F_REMAP_PENDING];
        *failureOccurred = (unsigned int)g->value[F_REMAP_FAILURE];
    }
    return leave(ret);
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *reasons) {
    if (reasons == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    return get_field(device, F_EVENT_REASONS, reasons);
}

nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device, unsigned long long *reasons) {
    return nvmlDeviceGetCurrentClocksEventReasons(device, reasons);
}

/* ---- MIG ------------------------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode, unsigned int *pendingMode) {
    fake_gpu *g;
    if (currentMode == NULL || pendingMode == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = enter_device(device, &g);
    if (ret == NVML_SUCCESS && (ret = g->mig_err) == NVML_SUCCESS)
        *currentMode = *pendingMode = g->mig_mode ? NVML_DEVICE_MIG_ENABLE : NVML_DEVICE_MIG_DISABLE;
    return leave(ret);
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    fake_gpu *g;
    if (count == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = enter_device(device, &g);
    if (ret == NVML_SUCCESS)
        *count = g->mig_err == NVML_SUCCESS && g->mig_mode ? MAX_MIG : 0;
    return leave(ret);
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index, nvmlDevice_t *migDevice) {
    fake_gpu *g;
    if (migDevice == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = enter_device(device, &g);
    if (ret == NVML_ERROR_NOT_SUPPORTED) /* a MIG device handle has no MIG devices */
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (ret != NVML_SUCCESS)
        return leave(ret);
    if (g->mig_err != NVML_SUCCESS)
        return leave(g->mig_err);
    if (!g->mig_mode || index >= MAX_MIG)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (!g->migs[index].present)
        return leave(NVML_ERROR_NOT_FOUND);
    *migDevice = (nvmlDevice_t)((uintptr_t)device | (uintptr_t)(index + 1) << MIG_SHIFT);
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice, nvmlDevice_t *device) {
    fake_gpu *g;
    fake_mig *m;
    if (device == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = enter_any(migDevice, &g, &m);
    if (ret == NVML_SUCCESS && m == NULL)
        ret = NVML_ERROR_INVALID_ARGUMENT; /* not a MIG device handle */
    if (ret == NVML_SUCCESS)
        *device = (nvmlDevice_t)((uintptr_t)migDevice & ((1u << MIG_SHIFT) - 1));
    return leave(ret);
}

/* ---- XID events ------------------------------------------------------------------------------- */

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    if (set == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    if (!initialized)
        return leave(NVML_ERROR_UNINITIALIZED);
    *set = calloc(1, sizeof(struct nvmlEventSet_st));
    if (*set == NULL)
        return leave(NVML_ERROR_MEMORY);
    sets_alive++;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    if (set == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    free(set);
    sets_alive--;
    return leave(NVML_SUCCESS);
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes, nvmlEventSet_t set) {
    fake_gpu *g;
    if (set == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = enter_device(device, &g);
    if (ret != NVML_SUCCESS)
        return leave(ret);
    if (g->events_unsupported || !(eventTypes & nvmlEventTypeXidCriticalError))
        return leave(NVML_ERROR_NOT_SUPPORTED);
    int i = (int)((uintptr_t)device - 1);
    set->registered[i] = 1;
    set->delivered[i] = g->nxids; /* only XIDs from now on */
    return leave(NVML_SUCCESS);
}

/* The next undelivered XID of a registered GPU, or NVML_ERROR_TIMEOUT after `timeoutms`. Sleeps
 * without the lock, so that readings (scrapes) are never held up by a waiting event thread. */
nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms) {
    struct timespec start, now, nap = {0, 5 * 1000 * 1000};
    if (set == NULL || data == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        pthread_mutex_lock(&lock);
        if (!initialized)
            return leave(NVML_ERROR_UNINITIALIZED);
        refresh();
        for (int i = 0; i < gpu_count; i++) {
            fake_gpu *g = &gpus[i];
            if (!set->registered[i])
                continue;
            if (set->delivered[i] > g->nxids) /* the state file was rewritten with fewer XIDs */
                set->delivered[i] = g->nxids;
            if (set->delivered[i] < g->nxids) {
                memset(data, 0, sizeof(*data));
                data->device = (nvmlDevice_t)(uintptr_t)(i + 1);
                data->eventType = nvmlEventTypeXidCriticalError;
                data->eventData = g->xids[set->delivered[i]++];
                data->gpuInstanceId = data->computeInstanceId = 0xFFFFFFFF;
                return leave(NVML_SUCCESS);
            }
        }
        pthread_mutex_unlock(&lock);
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed_ms = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (elapsed_ms >= (long)timeoutms)
            return NVML_ERROR_TIMEOUT;
        nanosleep(&nap, NULL);
    }
}
