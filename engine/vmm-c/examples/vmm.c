/*
 * A C VMM through libvcmdq_vmm_c: guest RAM it maps itself, one vIOMMU, one VCMDQ driven the
 * way Linux's tegra241-cmdqv guest driver drives it (BASE, CONFIG.EN, wait for
 * STATUS.ENABLED; commands and a CMD_SYNC; poll CONS; on CONS.ERR, the bad command replaced by
 * a CMD_SYNC and GERRORN = GERROR), then disable, detach, shut down. The register page is a
 * memfd (vcmdq_page_new_memfd) that the VMM maps a second time as the guest's view, as it would
 * map page 0 into the guest: every register access of the guest below goes through that
 * mapping, none through the library. The guest and the VMM's control loop take turns on one
 * thread. Exits 1 on anything unexpected.
 *
 * make vmm-c-example
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <time.h>

#include "vcmdq_vmm.h"

#define RAM_BYTES (1u << 20)
#define QUEUE_GPA 0x4000u
#define LOG2SIZE 4u
#define VIOMMU 1u
#define LIDX 0u

/* SMMUv3 commands: opcode in d0[7:0]. */
#define OP_TLBI_NH_ASID 0x12u
#define OP_ATC_INV 0x40u
#define OP_CMD_SYNC 0x46u

static int failures;

#define CHECK(cond, ...)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "vmm.c:%d: ", __LINE__);                                       \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fprintf(stderr, " (last error: %s)\n", vcmdq_last_error());                    \
            failures++;                                                                    \
            goto out;                                                                      \
        }                                                                                  \
    } while (0)

static volatile uint32_t *words;
static volatile uint64_t *ram;

static uint32_t reg(uint32_t off) { return words[(LIDX * VCMDQ_STRIDE + off) / 4]; }
static void set_reg(uint32_t off, uint32_t v) { words[(LIDX * VCMDQ_STRIDE + off) / 4] = v; }

static void write_slot(uint32_t index, uint64_t d0, uint64_t d1)
{
    volatile uint64_t *slot = ram + (QUEUE_GPA + 16 * (index & ((1u << LOG2SIZE) - 1))) / 8;
    slot[0] = d0;
    slot[1] = d1;
}

static void nap(void)
{
    struct timespec ts = {0, 50000};
    nanosleep(&ts, NULL);
}

/* The VMM's control loop, one round: CONFIG changes, traps, events. Returns events seen. */
static int vmm_round(const vcmdq_vmm *vmm, int *errors)
{
    struct vcmdq_event ev;
    struct vcmdq_trap trap;
    int n = 0;
    if (vcmdq_vmm_poll(vmm) < 0)
        return -1;
    while (vcmdq_vmm_next_trap(vmm, &trap) == 1)
        if (vcmdq_vmm_complete_trap(vmm, &trap) < 0)
            return -1;
    while (vcmdq_vmm_next_event(vmm, &ev) == 1) {
        n++;
        if (ev.kind == VCMDQ_EVENT_COMMAND_ERROR)
            ++*errors; /* a real VMM raises the guest's CMDQV interrupt here */
        else
            fprintf(stderr, "event %u: %s\n", ev.kind, ev.reason);
    }
    return n;
}

int main(void)
{
    vcmdq_vmm *vmm = NULL;
    vcmdq_guest_ram *gram = NULL;
    vcmdq_page *page = NULL;
    void *guest_view = MAP_FAILED;
    int page_fd = -1;
    int errors = 0;
    int64_t forwarded = -1;
    int i, r;

    void *mem = mmap(NULL, RAM_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    ram = mem;
    struct vcmdq_ram_region region = {.gpa = 0, .host = mem, .len = RAM_BYTES};

    CHECK(vcmdq_vmm_start(1, &vmm) == 0, "start");
    CHECK(vcmdq_vmm_add_device(vmm, 1, 0, 0x800) == 0, "add_device");
    CHECK(vcmdq_vmm_create_viommu(vmm, VIOMMU, 5, 0) == 0, "create_viommu");
    CHECK(vcmdq_vmm_set_dev_id(vmm, VIOMMU, 1, 0x10) == 0, "set_dev_id");
    r = vcmdq_vmm_create_viommu(vmm, VIOMMU, 6, 0);
    CHECK(r == -EEXIST && strstr(vcmdq_last_error(), "EEXIST"), "a second vIOMMU 1: %d", r);
    CHECK(vcmdq_guest_ram_new(&region, 1, &gram) == 0, "guest_ram_new");
    CHECK(vcmdq_page_new_memfd(&page, &page_fd) == 0, "page_new_memfd");
    guest_view = mmap(NULL, VCMDQ_PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, page_fd, 0);
    CHECK(guest_view != MAP_FAILED, "mapping the register page's memfd: %s", strerror(errno));
    words = guest_view;
    CHECK(words != vcmdq_page_words(page), "the guest's view is a mapping of its own");
    CHECK(vcmdq_vmm_attach_vcmdq(vmm, VIOMMU, LIDX, gram, page) == 0, "attach");
    r = vcmdq_vmm_attach_vcmdq(vmm, VIOMMU, 200, gram, page);
    CHECK(r == -EINVAL, "logical VCMDQ 200: %d", r);

    /* The guest: BASE = address | LOG2SIZE (page 1), CONS = PROD = 0, CONFIG.EN. */
    words[(VCMDQ_PAGE1_OFFSET + LIDX * VCMDQ_STRIDE + VCMDQ_BASE) / 4] = QUEUE_GPA | LOG2SIZE;
    words[(VCMDQ_PAGE1_OFFSET + LIDX * VCMDQ_STRIDE + VCMDQ_BASE) / 4 + 1] = 0;
    set_reg(VCMDQ_CONS, 0);
    set_reg(VCMDQ_PROD, 0);
    set_reg(VCMDQ_CONFIG, 1);
    for (i = 0; i < 100000 && !(reg(VCMDQ_STATUS) & 1); i++) {
        CHECK(vmm_round(vmm, &errors) >= 0, "control loop");
        nap();
    }
    CHECK(reg(VCMDQ_STATUS) & 1, "STATUS.ENABLED never set");

    /* A TLBI, an ATC_INV of vSID 0x10, a CMD_SYNC (CS=NONE); then poll CONS. */
    write_slot(0, OP_TLBI_NH_ASID | (uint64_t)7 << 48, 0);
    write_slot(1, OP_ATC_INV | (uint64_t)0x10 << 32, 0);
    write_slot(2, OP_CMD_SYNC, 0);
    set_reg(VCMDQ_PROD, 3);
    for (i = 0; i < 100000 && reg(VCMDQ_CONS) != 3; i++) {
        CHECK(vmm_round(vmm, &errors) >= 0, "control loop");
        nap();
    }
    CHECK(reg(VCMDQ_CONS) == 3, "CONS %#x did not pass the CMD_SYNC", reg(VCMDQ_CONS));

    /* An ATC_INV of an unbound vSID: CONS.ERR ILL, GERROR toggled, the error map bit. */
    write_slot(3, OP_ATC_INV | (uint64_t)0x99 << 32, 0);
    write_slot(4, OP_CMD_SYNC, 0);
    set_reg(VCMDQ_PROD, 5);
    for (i = 0; i < 100000 && !((reg(VCMDQ_GERROR) ^ reg(VCMDQ_GERRORN)) & 1); i++) {
        CHECK(vmm_round(vmm, &errors) >= 0, "control loop");
        nap();
    }
    CHECK((reg(VCMDQ_GERROR) ^ reg(VCMDQ_GERRORN)) & 1, "no error raised");
    CHECK(reg(VCMDQ_CONS) == (3 | 1u << 24), "CONS %#x, expected slot 3 with ILL",
          reg(VCMDQ_CONS));
    CHECK(words[(VCMDQ_VINTF_OFFSET + VCMDQ_LVCMDQ_ERR_MAP) / 4] & (1u << LIDX),
          "LVCMDQ_ERR_MAP bit not set");
    /* As Linux: the bad command becomes a CMD_SYNC, then GERRORN = GERROR. */
    write_slot(3, OP_CMD_SYNC, 0);
    set_reg(VCMDQ_GERRORN, reg(VCMDQ_GERROR));
    for (i = 0; i < 100000 && reg(VCMDQ_CONS) != 5; i++) {
        CHECK(vmm_round(vmm, &errors) >= 0, "control loop");
        nap();
    }
    CHECK(reg(VCMDQ_CONS) == 5, "CONS %#x did not pass the fixed slot", reg(VCMDQ_CONS));
    for (i = 0; i < 1000 && errors == 0; i++) {
        CHECK(vmm_round(vmm, &errors) >= 0, "control loop");
        nap();
    }
    CHECK(errors == 1, "%d command-error events, expected 1", errors);

    /* Disable: CONFIG = 0, wait for STATUS.ENABLED to clear. */
    set_reg(VCMDQ_CONFIG, 0);
    for (i = 0; i < 100000 && (reg(VCMDQ_STATUS) & 1); i++) {
        CHECK(vmm_round(vmm, &errors) >= 0, "control loop");
        nap();
    }
    CHECK(!(reg(VCMDQ_STATUS) & 1), "STATUS.ENABLED never cleared");
    CHECK(vcmdq_vmm_detach_vcmdq(vmm, VIOMMU, LIDX) == 0, "detach");
    r = vcmdq_vmm_detach_vcmdq(vmm, VIOMMU, LIDX);
    CHECK(r == -ENOENT, "a second detach: %d", r);

out:
    if (vmm)
        forwarded = vcmdq_vmm_shutdown(vmm);
    vcmdq_page_free(page);
    if (guest_view != MAP_FAILED)
        munmap(guest_view, VCMDQ_PAGE_BYTES);
    if (page_fd >= 0)
        close(page_fd);
    vcmdq_guest_ram_free(gram);
    munmap(mem, RAM_BYTES);
    if (!failures && forwarded != 2) {
        fprintf(stderr, "%lld commands forwarded, expected 2 (the TLBI and the ATC_INV)\n",
                (long long)forwarded);
        failures++;
    }
    if (failures)
        return 1;
    printf("vmm.c: a C VMM served a Tegra241 VCMDQ in its guest RAM: %lld commands forwarded, "
           "a CMD_SYNC completed, CONS.ERR handled and acknowledged\n",
           (long long)forwarded);
    return 0;
}
