/*
 * vcmdq_vmm.h: the C API of vcmdq-vmm (libvcmdq_vmm_c.so), for C VMMs.
 *
 * A guest's Tegra241 VINTF registers live in a register page (vcmdq_page_new, or
 * vcmdq_page_new_memfd to map page 0 into the guest); its VCMDQs'
 * commands live in its RAM, which the VMM describes once (vcmdq_guest_ram_new). The VMM
 * creates vIOMMUs and binds devices, attaches each logical VCMDQ, then calls vcmdq_vmm_poll
 * from a control thread (it notices CONFIG.EN set and cleared), takes events (errors: raise
 * the guest's interrupt) and trapped commands (CFGI_STE: complete them).
 *
 * Every function returns 0 (or a count) on success and a negative errno on failure;
 * vcmdq_last_error() gives the message on the same thread. No panic crosses the boundary.
 * Kept in sync with engine/vmm-c/src/lib.rs by engine/vmm-c/tests/header.rs.
 */
#ifndef VCMDQ_VMM_H
#define VCMDQ_VMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The register page: page 0 (per VCMDQ q at 0x80*q), page 1 (BASE), the VINTF's registers. */
#define VCMDQ_PAGE_BYTES (2 * 0x10000 + 0x1000)
#define VCMDQ_PAGE1_OFFSET 0x10000
#define VCMDQ_VINTF_OFFSET 0x20000
#define VCMDQ_STRIDE 0x80
#define VCMDQ_CONS 0x00
#define VCMDQ_PROD 0x04
#define VCMDQ_CONFIG 0x08
#define VCMDQ_STATUS 0x0c
#define VCMDQ_GERROR 0x10
#define VCMDQ_GERRORN 0x14
#define VCMDQ_BASE 0x00 /* in page 1, 64 bits: address [47:5], LOG2SIZE [4:0] */
#define VCMDQ_LVCMDQ_ERR_MAP 0xc0 /* in the VINTF's registers, 2 x 64 bits */
#define VCMDQ_MAX_RAM_REGIONS 64

#define VCMDQ_EVENT_COMMAND_ERROR 1
#define VCMDQ_EVENT_ENABLE_REFUSED 2
#define VCMDQ_EVENT_QUEUE_FAILED 3
#define VCMDQ_EVENT_DISABLE_TIMED_OUT 4

typedef struct VcmdqVmm vcmdq_vmm;
typedef struct VcmdqGuestRam vcmdq_guest_ram;
typedef struct VcmdqPage vcmdq_page;

struct vcmdq_ram_region {
    uint64_t gpa;  /* guest-physical address of the first byte */
    void *host;    /* where it is mapped in this process (8-byte aligned) */
    uint64_t len;  /* bytes */
};

struct vcmdq_event {
    uint32_t kind; /* VCMDQ_EVENT_* */
    uint32_t viommu;
    uint16_t lidx;
    uint32_t cons;   /* COMMAND_ERROR: CONS with CONS.ERR */
    uint32_t cerror; /* COMMAND_ERROR: CONS.ERR */
    uint64_t err_map[2];
    char reason[160];
};

struct vcmdq_trap {
    uint32_t viommu;
    uint16_t lidx;
    uint32_t ring; /* pass the trap back unchanged */
    uint32_t slot;
    uint64_t seq;
    uint64_t d0;
    uint64_t d1;
};

const char *vcmdq_last_error(void);

/* Starts an engine with `workers` workers, each on vcmdq's physical queue model (the C API
 * does not take a VMM's own physical queue yet; the Rust API's Vmm::start does). */
int vcmdq_vmm_start(uint32_t workers, vcmdq_vmm **out);
int64_t vcmdq_vmm_shutdown(vcmdq_vmm *vmm); /* frees; returns commands forwarded */
int vcmdq_vmm_create_viommu(const vcmdq_vmm *vmm, uint32_t id, uint16_t vmid, uint32_t smmu);
int vcmdq_vmm_add_device(const vcmdq_vmm *vmm, uint32_t device, uint32_t smmu, uint32_t psid);
int vcmdq_vmm_set_dev_id(const vcmdq_vmm *vmm, uint32_t viommu, uint32_t device, uint32_t vsid);
int64_t vcmdq_vmm_unset_dev_id(const vcmdq_vmm *vmm, uint32_t viommu, uint32_t device);

int vcmdq_guest_ram_new(const struct vcmdq_ram_region *regions, size_t n,
                        vcmdq_guest_ram **out);
void vcmdq_guest_ram_free(vcmdq_guest_ram *ram);

int vcmdq_page_new(vcmdq_page **out);
/* The page in a memfd: *fd (the caller's, to mmap MAP_SHARED into the guest and close). */
int vcmdq_page_new_memfd(vcmdq_page **out, int *fd);
volatile uint32_t *vcmdq_page_words(const vcmdq_page *page); /* VCMDQ_PAGE_BYTES / 4 words */
void vcmdq_page_free(vcmdq_page *page);

int vcmdq_vmm_attach_vcmdq(const vcmdq_vmm *vmm, uint32_t viommu, uint16_t lidx,
                           const vcmdq_guest_ram *ram, const vcmdq_page *page);
int vcmdq_vmm_detach_vcmdq(const vcmdq_vmm *vmm, uint32_t viommu, uint16_t lidx);
int vcmdq_vmm_poll(const vcmdq_vmm *vmm);
int vcmdq_vmm_next_event(const vcmdq_vmm *vmm, struct vcmdq_event *out);
int vcmdq_vmm_next_trap(const vcmdq_vmm *vmm, struct vcmdq_trap *out);
int vcmdq_vmm_complete_trap(const vcmdq_vmm *vmm, const struct vcmdq_trap *trap);
int64_t vcmdq_vmm_forwarded(const vcmdq_vmm *vmm);

#ifdef __cplusplus
}
#endif

#endif /* VCMDQ_VMM_H */
